//! Control-plane authentication. Every request a coordinator sends carries the cluster's
//! shared token (`authorization: Bearer …`, read from `--auth-token-file`, never from the
//! command line) and the coordinator's instance id. A worker refuses, and logs, requests
//! without the right token, and serves one coordinator at a time: another one is refused while
//! the current one is alive (it calls at least every second), and takes over once it has been
//! silent for `OWNER_LEASE`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, bail};
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::{Request, Status};

pub const COORDINATOR_HEADER: &str = "tp-coordinator-id";

/// How long a silent coordinator keeps its workers from others.
pub use crate::limits::OWNER_LEASE;

/// The shortest token accepted (a 32-character random string is what `generate` makes).
pub const MIN_TOKEN_CHARS: usize = 16;

/// Words of a refusal to a second coordinator, which `Cluster::connect` waits out.
pub const BUSY_WITH_ANOTHER: &str = "serves another coordinator";

/// The shared token; its Debug form does not show it.
#[derive(Clone)]
pub struct Token(Arc<str>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(…)")
    }
}

impl Token {
    /// Reads a token file: its first line, trimmed; printable ASCII, at least 16 characters.
    pub fn read(path: &Path) -> anyhow::Result<Token> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the auth token file {}", path.display()))?;
        let token = text.lines().next().unwrap_or("").trim();
        if token.len() < MIN_TOKEN_CHARS {
            bail!(
                "{}: the auth token must be at least {MIN_TOKEN_CHARS} characters (try: head -c 24 /dev/urandom | base64 > {})",
                path.display(),
                path.display()
            );
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            bail!(
                "{}: the auth token must be printable ASCII without spaces",
                path.display()
            );
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            if let Ok(meta) = std::fs::metadata(path)
                && meta.permissions().mode() & 0o077 != 0
            {
                tracing::warn!(
                    file = %path.display(),
                    "the auth token file is readable by other users; chmod 600 it"
                );
            }
        }
        Ok(Token(token.into()))
    }

    /// A fresh random token (32 hex characters from the kernel's random source).
    pub fn generate() -> anyhow::Result<Token> {
        let mut bytes = [0u8; 16];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut bytes))
            .context("cannot read /dev/urandom for a token")?;
        Ok(Token(
            bytes
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
                .into(),
        ))
    }

    /// Writes the token to a new file only this user can read, in a new private directory
    /// under `parent`; returns the file's path.
    pub fn write_private(&self, parent: &Path) -> anyhow::Result<PathBuf> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let id = Token::generate()?;
        let dir = parent.join(format!("tp-auth-{}", &id.0[..12]));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join("token");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        std::io::Write::write_all(&mut file, self.0.as_bytes())?;
        Ok(path)
    }

    fn bearer(&self) -> String {
        format!("Bearer {}", self.0)
    }

    /// Whether `presented` is `Bearer <token>`, in time independent of where they differ.
    pub fn accepts(&self, presented: &[u8]) -> bool {
        let expected = self.bearer();
        let expected = expected.as_bytes();
        let mut differ = (expected.len() != presented.len()) as u8;
        for (i, &e) in expected.iter().enumerate() {
            differ |= e ^ presented.get(i).copied().unwrap_or(0);
        }
        differ == 0
    }
}

/// What a coordinator adds to every request.
#[derive(Clone)]
pub struct ClientAuth {
    bearer: Option<AsciiMetadataValue>,
    id: AsciiMetadataValue,
}

impl ClientAuth {
    /// A coordinator instance with a fresh id, presenting `token` if it has one.
    pub fn new(token: Option<&Token>) -> anyhow::Result<ClientAuth> {
        let bearer = token
            .map(|t| t.bearer().parse())
            .transpose()
            .context("the auth token is not a valid header value")?;
        let id = Token::generate()?.0.parse().expect("hex is a valid header");
        Ok(ClientAuth { bearer, id })
    }
}

impl tonic::service::Interceptor for ClientAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let metadata = request.metadata_mut();
        if let Some(bearer) = &self.bearer {
            metadata.insert("authorization", bearer.clone());
        }
        metadata.insert(COORDINATOR_HEADER, self.id.clone());
        Ok(request)
    }
}

/// A worker's check of every control-plane request.
pub struct Gate {
    token: Option<Token>,
    owner: Mutex<Option<(String, Instant)>>,
}

impl Gate {
    pub fn new(token: Option<Token>) -> Gate {
        Gate {
            token,
            owner: Mutex::new(None),
        }
    }

    pub fn check(&self, request: &Request<()>) -> Result<(), Status> {
        let peer = request
            .remote_addr()
            .map_or_else(|| "an unknown peer".to_string(), |a| a.to_string());
        self.admit(request.metadata(), &peer, Instant::now())
    }

    fn admit(&self, metadata: &MetadataMap, peer: &str, now: Instant) -> Result<(), Status> {
        if let Some(token) = &self.token {
            let presented = metadata
                .get("authorization")
                .map(|v| v.as_bytes())
                .unwrap_or_default();
            if !token.accepts(presented) {
                let what = if presented.is_empty() {
                    "no token"
                } else {
                    "a wrong token"
                };
                tracing::warn!(%peer, "refused a control-plane request with {what}");
                return Err(Status::unauthenticated(format!(
                    "{what}: this worker needs the cluster's token (--auth-token-file)"
                )));
            }
        }
        let id = metadata
            .get(COORDINATOR_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let mut owner = self.owner.lock().unwrap();
        match owner.as_mut() {
            Some((current, seen)) if *current != id && now.duration_since(*seen) < OWNER_LEASE => {
                let left = OWNER_LEASE - now.duration_since(*seen);
                tracing::warn!(%peer, "refused a second coordinator");
                Err(Status::failed_precondition(format!(
                    "this worker {BUSY_WITH_ANOTHER}, which was active {:.1} s ago; it can take over {:.1} s after that one stops",
                    now.duration_since(*seen).as_secs_f64(),
                    left.as_secs_f64()
                )))
            }
            Some((current, seen)) if *current == id => {
                *seen = now;
                Ok(())
            }
            _ => {
                if owner.is_some() {
                    tracing::info!(%peer, "a new coordinator takes over");
                }
                *owner = Some((id, now));
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn metadata(bearer: Option<&str>, id: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        if let Some(b) = bearer {
            m.insert("authorization", b.parse().unwrap());
        }
        m.insert(COORDINATOR_HEADER, id.parse().unwrap());
        m
    }

    #[test]
    fn tokens_and_owners() {
        let token = Token("0123456789abcdef0123".into());
        let gate = Gate::new(Some(token.clone()));
        let t0 = Instant::now();
        let good = token.bearer();
        assert!(gate.admit(&metadata(Some(&good), "a"), "p", t0).is_ok());
        for bad in [None, Some("Bearer 0123456789abcdef0124"), Some("Bearer x")] {
            let e = gate.admit(&metadata(bad, "a"), "p", t0).unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated);
        }
        // A second coordinator is refused while the first is active, admitted after its lease.
        let e = gate
            .admit(
                &metadata(Some(&good), "b"),
                "p",
                t0 + Duration::from_secs(1),
            )
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert!(e.message().contains(BUSY_WITH_ANOTHER));
        assert!(
            gate.admit(
                &metadata(Some(&good), "a"),
                "p",
                t0 + Duration::from_secs(4)
            )
            .is_ok()
        );
        assert!(
            gate.admit(
                &metadata(Some(&good), "b"),
                "p",
                t0 + Duration::from_secs(8)
            )
            .is_err()
        );
        assert!(
            gate.admit(
                &metadata(Some(&good), "b"),
                "p",
                t0 + Duration::from_secs(10)
            )
            .is_ok()
        );
        // Without a token the gate only keeps owners apart.
        let open = Gate::new(None);
        assert!(open.admit(&metadata(None, "a"), "p", t0).is_ok());
        assert!(open.admit(&metadata(None, "b"), "p", t0).is_err());
    }

    #[test]
    fn token_files_are_checked() {
        let dir = std::env::temp_dir().join(format!("tp-token-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let short = dir.join("short");
        std::fs::write(&short, "abc\n").unwrap();
        assert!(
            Token::read(&short)
                .unwrap_err()
                .to_string()
                .contains("at least 16")
        );
        let generated = Token::generate().unwrap();
        let path = generated.write_private(&dir).unwrap();
        let read = Token::read(&path).unwrap();
        assert!(read.accepts(generated.bearer().as_bytes()));
        assert_eq!(format!("{read:?}"), "Token(…)");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
