//! The process's resource limits, as the layers that size themselves by them read them.
//! Knows nothing of what the limits are shared out to.

/// The soft limit on open descriptors; `None` when it cannot be read or is unlimited.
pub fn descriptors() -> Option<usize> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only the struct it is given.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
    (ok && limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur as usize)
}
