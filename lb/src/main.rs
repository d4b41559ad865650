//! The lb binary: read the config, start tracing, run until SIGTERM or Ctrl-C.

use lb::config::{Config, LogFormat};

fn main() -> std::process::ExitCode {
    tune_allocator();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        print!("{}", Config::help());
        return std::process::ExitCode::SUCCESS;
    }
    if args.iter().any(|a| a == "--version" || a == "-V") {
        println!("lb {}", env!("CARGO_PKG_VERSION"));
        return std::process::ExitCode::SUCCESS;
    }
    // `lb probe [flags]`: the image's HEALTHCHECK, ready when the admin listener says so.
    let probing = args.first().is_some_and(|a| a == "probe");
    let args = if probing { &args[1..] } else { &args[..] };
    let config = match Config::lookup_from_args_and_env(args).and_then(Config::from_lookup) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("lb: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if probing {
        return switchyard_daemon::probe::exit_code(config.admin_listen, "/readyz");
    }
    switchyard_daemon::process::init_logging(config.log_format == LogFormat::Json);
    // This thread is worker 0; `run` starts the others, each on a runtime of its own.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut outcome = Ok(());
    lb::block_on(
        &runtime,
        Box::pin(async {
            outcome = lb::run(config, switchyard_daemon::process::shutdown_signal()).await;
        }),
    );
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "lb failed");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Fixes glibc's heap thresholds, each unless the environment sets it (`GLIBC_TUNABLES`, or
/// glibc's older `MALLOC_MMAP_THRESHOLD_` and `MALLOC_TRIM_THRESHOLD_`).
///
/// By default glibc moves them as it goes: the top of the heap goes back to the kernel
/// whenever more than twice the largest mapped block freed so far lies free there. Streaming
/// large bodies frees and allocates read buffers of up to 256 KiB at that edge, so the same
/// memory went back and was faulted in again page by page: 26 minor faults per 1 MiB response
/// at 16 connections, a sixth of the lb's CPU on that row (BENCHMARKS.md). Now blocks under
/// 1 MiB come from the heap, and up to 4 MiB free at a heap's top is kept.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_allocator() {
    let set = |tunable: &str, variable: &str| {
        std::env::var_os(variable).is_some()
            || std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains(tunable))
    };
    // SAFETY: mallopt only sets the allocator's parameters, here before any other thread is
    // started.
    unsafe {
        if !set("glibc.malloc.mmap_threshold", "MALLOC_MMAP_THRESHOLD_") {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        }
        if !set("glibc.malloc.trim_threshold", "MALLOC_TRIM_THRESHOLD_") {
            libc::mallopt(libc::M_TRIM_THRESHOLD, 4 << 20);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_allocator() {}
