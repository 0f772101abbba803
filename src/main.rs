use bst_artifact_server::cli::{normalize_args, Cli, Command};
use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse_from(normalize_args(std::env::args_os()));
    let result = match cli.command {
        Command::Serve(args) => {
            bst_artifact_server::logging::init(args.log_level.as_filter(), args.log_target);
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(bst_artifact_server::server::run(args)))
        }
        Command::Gc(args) => bst_artifact_server::admin::gc(&args),
        Command::Verify(args) => bst_artifact_server::admin::verify(&args),
        Command::Stats(args) => bst_artifact_server::admin::stats(&args),
        Command::InstallUnits(args) => bst_artifact_server::units::run(&args),
        Command::Healthcheck(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(bst_artifact_server::healthcheck::check(&args)))
            .map(|summary| println!("{summary}")),
        Command::GenServerCert(args) => bst_artifact_server::certs::gen_server_cert(&args),
        Command::GenClientCert(args) => bst_artifact_server::certs::gen_client_cert(&args),
        Command::AddClient(args) => bst_artifact_server::certs::add_client(&args),
        Command::ListClients(args) => bst_artifact_server::certs::list_clients(&args),
        Command::RemoveClient(args) => bst_artifact_server::certs::remove_client(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "bst-artifact-server: error: {}",
                bst_artifact_server::error_text::one_line(e.as_ref())
            );
            ExitCode::FAILURE
        }
    }
}
