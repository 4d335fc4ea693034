//! `vmlink logs TARGET PATH [-n N] [-f]`: the end of a file in the guest, and with `-f` what is
//! appended to it, across rotation and truncation (like `tail -F`).

use std::process::ExitCode;

use vmlink_agent::client::Client;
use vmlink_proto::agent::{Logs, MAX_LOG_LINES};

use crate::target::Target;

/// Print the end of a file in a guest; -f follows it like tail -F
///
/// Prints the last lines of the file; with -f, keeps printing what is
/// appended to it, following it across rotation (renamed and recreated)
/// and truncation, like tail -F, until interrupted. The agent checks a
/// followed file every 200 ms. The first tail is at most 16 MiB.
///
/// Examples:
///   vmlink logs vsock:3:7878 /var/log/syslog
///   vmlink logs -f -n 100 lab:dev /var/log/nginx/access.log
#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// The agent: an address (vsock:3:7878, unix:PATH, hvsock:UDS:PORT), lab:NAME, or qga+ADDR.
    #[arg(value_parser = crate::target::parse_target)]
    target: Target,
    /// The file in the guest (absolute).
    path: String,
    /// How many lines from the end to print first (at most 100000).
    #[arg(short = 'n', long, default_value_t = 10, value_name = "N",
          value_parser = clap::value_parser!(u32).range(0..=MAX_LOG_LINES as i64))]
    lines: u32,
    /// Keep printing what is appended (across rotation and truncation).
    #[arg(short, long)]
    follow: bool,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    if !a.path.starts_with('/') {
        anyhow::bail!("the guest path {:?} must be absolute", a.path);
    }
    crate::runtime()?.block_on(async {
        let addr = a.target.resolve()?.agent("logs")?;
        let c = Client::connect(&addr).await?;
        let req = Logs {
            path: a.path,
            lines: a.lines,
            follow: a.follow,
        };
        c.logs(req, tokio::io::stdout()).await?;
        Ok(ExitCode::SUCCESS)
    })
}
