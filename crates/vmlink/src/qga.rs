//! `vmlink qga TARGET COMMAND [JSON-ARGS]`: one raw qemu-guest-agent command.
//!
//! Works against a stock qemu-ga and against `vmlink-agent --qga` alike. The session is the
//! one libvirt uses: first a resynchronisation (0xFF, then `guest-sync-delimited` with a
//! random id; everything up to the 0xFF that prefixes the matching answer is discarded, which
//! clears stale output left on a virtio-serial port), then the command, then one answer line.
//! Commands that do not answer on success (`guest-shutdown`) are not waited for.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::Args as ClapArgs;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vmlink_proto::qga::{encode_request, parse_response, Response, SENTINEL};
use vmlink_transport::{Addr, AsyncStream};

/// Longest answer line accepted (libvirt's bound on qemu-ga replies is 10 MiB; guest-file-read
/// can return 48 MiB of data, i.e. 64 MiB of base64).
const MAX_ANSWER: usize = 72 << 20;

/// Send one raw command to a qemu-guest-agent (stock qemu-ga or vmlink-agent --qga) and print
/// its "return" as one line of JSON. An error answer is printed on stderr and exits 1.
///
/// Examples:
///
///   vmlink qga unix:/var/lib/libvirt/qemu/channel/target/domain-1-vm/org.qemu.guest_agent.0 guest-info
///
///   vmlink qga unix:/tmp/qga.sock guest-exec '{"path":"/bin/uname","arg":["-a"],"capture-output":true}'
#[derive(Debug, ClapArgs)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// The agent's address (QEMU's chardev socket on the host, or any transport address).
    #[arg(value_parser = crate::parse_addr)]
    target: Addr,
    /// The command, e.g. guest-ping, guest-info, guest-exec.
    command: String,
    /// The command's arguments, one JSON object.
    json_args: Option<String>,
    /// Give up waiting for an answer after this many seconds.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let arguments = match &args.json_args {
        None => None,
        Some(text) => {
            let v: Value = serde_json::from_str(text)
                .with_context(|| format!("JSON-ARGS is not valid JSON: {text}"))?;
            if !v.is_object() {
                bail!("JSON-ARGS must be a JSON object, not {text}");
            }
            Some(v)
        }
    };
    let timeout = Duration::from_secs(args.timeout);
    crate::runtime()?.block_on(async {
        let answer = tokio::time::timeout(timeout, session(&args, arguments.as_ref()))
            .await
            .map_err(|_| anyhow!("{}: no answer within {}s", args.target, args.timeout))??;
        match answer {
            None => Ok(ExitCode::SUCCESS),
            Some(Response::Return(v)) => {
                println!("{v}");
                Ok(ExitCode::SUCCESS)
            }
            Some(Response::Error(e)) => {
                eprintln!("vmlink: {}: {}: {}", args.target, e.class, e.desc);
                Ok(ExitCode::from(1))
            }
        }
    })
}

async fn session(args: &Args, arguments: Option<&Value>) -> anyhow::Result<Option<Response>> {
    let mut stream = AsyncStream::connect(&args.target).await?;
    let mut reader = LineReader::default();
    // Resynchronise: a random id that stale output cannot contain.
    let nonce = i64::from(std::process::id())
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() as i64)
            .unwrap_or(0);
    let mut sync = vec![SENTINEL];
    sync.extend(encode_request(
        "guest-sync-delimited",
        Some(&serde_json::json!({ "id": nonce })),
        None,
    ));
    stream.write_all(&sync).await?;
    loop {
        reader.skip_to_sentinel(&mut stream).await?;
        let line = reader.line(&mut stream).await?;
        if parse_response(&line) == Some(Response::Return(Value::from(nonce))) {
            break;
        }
    }
    stream
        .write_all(&encode_request(&args.command, arguments, None))
        .await?;
    if args.command == "guest-shutdown" {
        return Ok(None);
    }
    let line = reader.line(&mut stream).await?;
    parse_response(&line).map(Some).ok_or_else(|| {
        anyhow!(
            "{}: not a qemu-ga answer: {}",
            args.target,
            String::from_utf8_lossy(&line)
        )
    })
}

/// Reads answer lines, keeping what arrived past the last one.
#[derive(Default)]
struct LineReader {
    buf: Vec<u8>,
}

impl LineReader {
    async fn fill(&mut self, stream: &mut AsyncStream) -> anyhow::Result<()> {
        let mut chunk = [0u8; 64 * 1024];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("the agent closed the connection before answering");
        }
        self.buf.extend_from_slice(&chunk[..n]);
        if self.buf.len() > MAX_ANSWER {
            bail!("the agent's answer is longer than {MAX_ANSWER} bytes");
        }
        Ok(())
    }

    async fn skip_to_sentinel(&mut self, stream: &mut AsyncStream) -> anyhow::Result<()> {
        loop {
            if let Some(at) = self.buf.iter().position(|&b| b == SENTINEL) {
                self.buf.drain(..=at);
                return Ok(());
            }
            self.buf.clear();
            self.fill(stream).await?;
        }
    }

    async fn line(&mut self, stream: &mut AsyncStream) -> anyhow::Result<Vec<u8>> {
        loop {
            if let Some(at) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=at).collect();
                return Ok(line);
            }
            self.fill(stream).await?;
        }
    }
}
