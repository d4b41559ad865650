//! The registrar binary: read the config, start tracing, run until SIGTERM or Ctrl-C.

use registrar::config::Config;

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        print!("{}", Config::help());
        return std::process::ExitCode::SUCCESS;
    }
    // `registrar probe [flags]`: the image's HEALTHCHECK (alive and serving its admin port).
    let probing = args.first().is_some_and(|a| a == "probe");
    let args = if probing { &args[1..] } else { &args[..] };
    let config = match Config::lookup_from_args_and_env(args).and_then(Config::from_lookup) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("registrar: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if probing {
        return switchyard_daemon::probe::exit_code(config.admin_listen, "/healthz");
    }
    switchyard_daemon::process::init_logging(config.json_logs);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(registrar::run(
        config,
        switchyard_daemon::process::shutdown_signal(),
    )) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "registrar failed");
            std::process::ExitCode::FAILURE
        }
    }
}
