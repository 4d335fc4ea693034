//! `vmlink run TARGET SCRIPT [ARGS]...`: send a local script to the guest's agent and run it
//! there, streamed like `vmlink exec`. The agent holds the script in an anonymous memory file
//! (memfd), so nothing is written to the guest's filesystems.

use std::process::ExitCode;

use anyhow::Context;
use vmlink_agent::ExecRequest;
use vmlink_proto::agent::MAX_SCRIPT_LEN;

use crate::target::Target;

/// Run a local script in a guest (nothing saved there), output streamed
///
/// The script runs with the arguments given; output streams back as for
/// exec and the exit status is the script's (128+N for signal N, 124 after
/// --timeout). A script with a #! line runs with that interpreter; without
/// one, with /bin/sh. The script travels in the request (at most 16 MiB)
/// and the agent keeps it in memory (a memfd): nothing is saved in the
/// guest, and its $0 there is /proc/self/fd/N.
///
/// Examples:
///   vmlink run vsock:3:7878 ./check-disk.sh /var
///   vmlink run lab:dev --user nobody --timeout 1m ./smoke-test.py --quick
///   vmlink run -i vsock:3:7878 ./filter.sh < input.txt
#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// The agent: an address (vsock:3:7878, unix:PATH, hvsock:UDS:PORT), lab:NAME, or qga+ADDR.
    #[arg(value_parser = crate::target::parse_target)]
    target: Target,
    /// The local script to run, then its arguments (everything after SCRIPT goes to the
    /// script, flags included: give vmlink's own flags before SCRIPT).
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "SCRIPT [ARGS]"
    )]
    script: Vec<String>,
    /// Set an environment variable for the script (repeatable).
    #[arg(long, value_name = "K=V", value_parser = crate::session::parse_env)]
    env: Vec<(String, String)>,
    /// Working directory of the script.
    #[arg(long, value_name = "DIR")]
    cwd: Option<String>,
    /// Forward this process's stdin, EOF included (otherwise /dev/null).
    #[arg(short, long)]
    interactive: bool,
    /// Run as this guest user (the agent must run as root).
    #[arg(short, long, value_name = "USER")]
    user: Option<String>,
    /// Kill the script's process group after this long (30, 1.5s, 500ms, 5m)
    /// and exit with status 124, like timeout(1).
    #[arg(long, value_name = "DURATION", value_parser = crate::session::parse_timeout)]
    timeout: Option<std::time::Duration>,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let Some((path, args)) = a.script.split_first() else {
        anyhow::bail!("run needs a script");
    };
    let path = std::path::Path::new(path);
    let script = std::fs::read(path)
        .with_context(|| format!("cannot read the script {}", path.display()))?;
    if script.len() as u64 > MAX_SCRIPT_LEN {
        anyhow::bail!(
            "the script {} has {} bytes; vmlink run carries at most {MAX_SCRIPT_LEN}",
            path.display(),
            script.len()
        );
    }
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("script")
        .to_string();
    let rt = crate::runtime()?;
    let result = rt.block_on(async {
        let addr = a.target.resolve()?.agent("run")?;
        let mut argv = vec![name];
        argv.extend(args.iter().cloned());
        let req = ExecRequest {
            argv,
            env: a.env,
            cwd: a.cwd,
            user: a.user,
            ..ExecRequest::default()
        };
        crate::session::run(crate::session::Session {
            addr,
            req,
            script: Some(script),
            interactive: a.interactive,
            tty_size: None,
            timeout: a.timeout,
        })
        .await
    });
    // A read of a terminal stdin (-i) may still be blocked on a thread: exit without waiting
    // for a key press that would end it.
    rt.shutdown_background();
    result
}
