//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can keep [`crate::prepare`], [`crate::run`] or
/// [`crate::spawn`] from producing an [`crate::Outcome`].
///
/// A guest that boots but cannot run the command, or a command that fails,
/// is not an error: it is an [`crate::Outcome`] with code 125 or the
/// command's own status.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LabError {
    /// A [`crate::LabConfig`] field or the command line is unusable.
    #[error("invalid {option}: {reason}")]
    BadOption {
        /// The field or argument, e.g. `mem` or `modules[2]`.
        option: String,
        /// What is wrong with it.
        reason: String,
    },

    /// Debian packages the lab needs are not installed, and may not be.
    #[error("missing packages {}: {reason}", packages.join(" "))]
    MissingPackages {
        /// Package names, as `apt-get install` wants them.
        packages: Vec<String>,
        /// Why they were not installed (e.g. `VMLINK_LAB_NO_INSTALL=1`).
        reason: String,
    },

    /// `apt-get` ran but failed.
    #[error("installing {} with apt-get failed ({detail})", packages.join(" "))]
    Install {
        /// Package names that were to be installed.
        packages: Vec<String>,
        /// The failing step and its exit status.
        detail: String,
        /// The I/O error, when apt-get could not even be started.
        #[source]
        source: Option<std::io::Error>,
    },

    /// No `/boot/vmlinuz-*` has a matching `/lib/modules/<version>/modules.dep`.
    #[error("no usable guest kernel: no /boot/vmlinuz-* has a matching /lib/modules/<version>/modules.dep")]
    NoKernel,

    /// The guest kernel lacks a module the lab needs or that was asked for.
    #[error("kernel module {module} is not available for kernel {kernel_version}")]
    NoModule {
        /// The module name as given.
        module: String,
        /// The guest kernel's release, e.g. `6.1.0-56-amd64`.
        kernel_version: String,
    },

    /// A file operation failed.
    #[error("cannot {action} {}", path.display())]
    Io {
        /// What was being done, e.g. `read` or `create the run directory`.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A helper program (xz, dpkg-query, ...) failed.
    #[error("{program} failed: {detail}")]
    Tool {
        /// The program.
        program: String,
        /// Its exit status or what went wrong.
        detail: String,
        /// The I/O error, when it could not be started.
        #[source]
        source: Option<std::io::Error>,
    },

    /// QEMU could not be started, or stopped before the guest was usable.
    #[error("QEMU {what}{}", if stderr.is_empty() { String::new() } else { format!(": {}", stderr.trim_end()) })]
    Qemu {
        /// What went wrong, e.g. `could not be started`.
        what: String,
        /// QEMU's own error output, if any.
        stderr: String,
        /// The I/O error, when there was one.
        #[source]
        source: Option<std::io::Error>,
    },

    /// QEMU did not listen on a `serials` socket in time.
    #[error("QEMU did not listen on the serial socket {} within {seconds} s", path.display())]
    SocketTimeout {
        /// The socket path from [`crate::LabConfig::serials`].
        path: PathBuf,
        /// How long was waited.
        seconds: u64,
    },
}

impl LabError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        LabError::Io {
            action,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn bad(option: impl Into<String>, reason: impl Into<String>) -> Self {
        LabError::BadOption {
            option: option.into(),
            reason: reason.into(),
        }
    }
}
