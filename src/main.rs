use bst_artifact_server as app;
use bst_artifact_server::{normalize_args, Cli, Command};
use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse_from(normalize_args(std::env::args_os()));
    let result = match cli.command {
        Command::Serve(args) => {
            app::init_logging(args.log_level.as_filter(), args.log_target);
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(app::serve(args)))
        }
        Command::Gc(args) => app::gc(&args),
        Command::Verify(args) => app::verify(&args),
        Command::Stats(args) => app::stats(&args),
        Command::InstallUnits(args) => app::install_units(&args),
        Command::Healthcheck(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(app::healthcheck(&args)))
            .map(|summary| println!("{summary}")),
        Command::GenServerCert(args) => app::gen_server_cert(&args),
        Command::GenClientCert(args) => app::gen_client_cert(&args),
        Command::AddClient(args) => app::add_client(&args),
        Command::ListClients(args) => app::list_clients(&args),
        Command::RemoveClient(args) => app::remove_client(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bst-artifact-server: error: {}", app::one_line(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}
