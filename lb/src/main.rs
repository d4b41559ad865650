//! The lb binary: read the config, start tracing, run until SIGTERM or Ctrl-C.

use lb::config::{Config, LogFormat};

/// mimalloc, not glibc's malloc. Every new connection allocates a task (128-byte aligned,
/// which glibc serves only from its slow path) and blocks over 1 KiB (past glibc's per-thread
/// cache); mimalloc serves both from per-thread free lists: 9% fewer user-space instructions
/// per new connection, 4% per keep-alive request (BENCHMARKS.md). Without transparent huge
/// pages (`keep_huge_pages_off`). Its `MIMALLOC_` environment variables tune it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    keep_huge_pages_off();
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

/// Transparent huge pages off for the lb, unless `MIMALLOC_ALLOW_THP` says otherwise. Where
/// the kernel gives them to every large mapping (`always`), mimalloc's segments would be
/// faulted in 2 MiB at a time for the few KiB an idle connection uses; the build's `no_thp`
/// only stops mimalloc asking for them (`madvise`), and mimalloc turns them off itself only
/// when that variable is 0.
#[cfg(target_os = "linux")]
fn keep_huge_pages_off() {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // SAFETY: sets a flag of this process, with no memory passed.
        unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    }
}

#[cfg(not(target_os = "linux"))]
fn keep_huge_pages_off() {}
