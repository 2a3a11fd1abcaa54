//! [`TokenFile`]: a token that another process keeps in a file, such as a Kubernetes projected
//! service account token or a token that a sidecar writes.
//!
//! The file is read on a blocking thread, never on the runtime. Whether it changed is noticed
//! through [`Token::with_refresh_at`]: each token asks the layer to fetch again after the
//! check interval, in the background, while it stays in service.

use std::{
    fmt,
    fs::File,
    io::{self, Read},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::time::Instant;

use crate::{Error, Token, TokenSource, MAX_LIFETIME};

/// How often the file is looked at for a new token, unless configured.
const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(30);

/// The largest file that is read, unless configured.
const DEFAULT_MAX_SIZE: usize = 64 * 1024;

/// A token source that reads the token from a file, and reads it again when it may have
/// changed.
///
/// For tokens that another process keeps up to date: Kubernetes projected service account
/// tokens, tokens that a sidecar or an agent writes, API keys mounted from a secret.
///
/// ```
/// use std::time::Duration;
/// use tower_token_refresh::{source::TokenFile, TokenSource};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// # let folder = tempfile::tempdir()?;
/// # let path = folder.path().join("token");
/// std::fs::write(&path, "opaque-token\n")?;
///
/// let source = TokenFile::new(&path).check_interval(Duration::from_secs(10));
/// let token = source.fetch(None).await?;
///
/// assert_eq!(token.expose_secret(), "opaque-token");
/// assert_eq!(token.expires_at(), None, "not a JWT: expiry unknown");
/// # Ok(())
/// # }
/// ```
///
/// Behind the layer, for a Kubernetes projected service account token:
///
/// ```no_run
/// use tower_token_refresh::{source::TokenFile, RefreshLayer};
///
/// let source = TokenFile::new("/var/run/secrets/kubernetes.io/serviceaccount/token");
/// let layer = RefreshLayer::new(source);
/// # let _ = layer;
/// ```
///
/// # What is read
///
/// The whole file, which must be a regular file (symbolic links are followed, as Kubernetes
/// volumes need) of at most [`max_size`](TokenFile::max_size) bytes, holding UTF-8 text.
/// Leading and trailing ASCII whitespace (spaces, tabs, line breaks) is always trimmed, so a
/// file written by `echo` works. What remains is the token: it must not be empty and may hold
/// only visible ASCII characters and spaces, the characters the layer accepts in a header.
///
/// The file is read with [`tokio::task::spawn_blocking`], never on the runtime's threads, so
/// fetching needs a tokio runtime. A read that hangs (a stalled network file system) is ended
/// for the layer by its refresh timeout, though the blocking thread may stay until the read
/// returns.
///
/// # Expiry
///
/// When the token is a JWT in JWS compact form (`header.payload.signature`, each part
/// base64url, the header a JSON object) and its payload has a numeric `exp` claim, the token
/// expires then: the seconds left until `exp` by the system clock are added to the monotonic
/// clock at the moment the file was read. An `exp` in the past makes a token that is expired
/// on arrival; lifetimes longer than [`MAX_LIFETIME`] are clamped to it. Any other token
/// (opaque, encrypted JWE, a JWT without a usable `exp`) has an unknown expiry.
///
/// **No signature is checked**, and no other claim is looked at: the server that receives the
/// token does that. The expiry only tells the layer when to read the file again. The layer's
/// own [`refresh_ahead`](crate::RefreshLayer::refresh_ahead) and
/// [`expiry_margin`](crate::RefreshLayer::expiry_margin) apply as for any token, so this
/// source has no margin of its own.
///
/// # Changes
///
/// Each token asks the layer, with [`Token::with_refresh_at`], to fetch again after the
/// [`check_interval`](TokenFile::check_interval). The layer then reads the file once in the
/// background while requests keep using the token in service. If the file still holds the
/// same token, the same token comes back (same secret, same expiry), checked again one
/// interval later; if it holds a new one, the new one is installed and logged at DEBUG
/// (without its secret). If the check fails (the file is being replaced, say), the token in
/// service stays in service until it expires.
///
/// A token that expires sooner than the next check is read again when the layer finds it
/// stale. If the file still holds it then, the layer gets it back and finds it stale again:
/// until the file is rewritten, the file is read again at each chance the layer has, one
/// read at a time. Writers that replace the token well before it expires (the kubelet does
/// at 80% of its lifetime) never meet this.
///
/// # Rejection
///
/// When a server rejects the token, the layer fetches again and this source reads the file
/// again: a token that was rewritten meanwhile is used for the retry at once. If the file
/// still holds the rejected token, it is handed back without waiting, and the layer retries
/// once with it; if the server rejects it again, the caller gets that response as it is
/// (R6). Waiting for the file to change instead would hold up every caller for a file that
/// may never change, and the server's answer says more than an invented error would. The
/// next rejected call reads the file again.
///
/// # Writing the file
///
/// Writers should replace the file atomically (write a new file, then rename it over the
/// old one), as the kubelet does. A file that is read while it is being written may be
/// empty, which is a transient error, or hold part of a token, which the server rejects.
///
/// # Errors
///
/// Every problem with the file is an [`Error::is_file`], whose source chain names the file
/// (and holds the I/O error, if there was one). Whether trying again can help:
///
/// | the file | trying again |
/// |---|---|
/// | is missing, or cannot be read | transient: a sidecar may not have written it yet |
/// | is empty after trimming | transient: it may be in the middle of a rewrite |
/// | is not a regular file | terminal |
/// | is larger than the size limit | terminal |
/// | is not UTF-8 | terminal |
/// | holds characters not allowed in a header | terminal |
///
/// The layer asks again after its failure back-off whatever the kind, so a file fixed by an
/// operator is picked up. Errors name the file's path (it is not secret) and never quote
/// what the file holds.
#[derive(Clone, Debug)]
pub struct TokenFile {
    path: Arc<Path>,
    check_interval: Duration,
    max_size: usize,
}

impl TokenFile {
    /// A source that reads the token from the file at `path`.
    ///
    /// The file need not exist yet: it is read when the layer first needs a token.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: Arc::from(path.into()),
            check_interval: DEFAULT_CHECK_INTERVAL,
            max_size: DEFAULT_MAX_SIZE,
        }
    }

    /// How long a token is used before the file is read again to see whether it changed; the
    /// read happens in the background, on the first request after the interval.
    ///
    /// Default: 30 seconds. Longer intervals than [`MAX_LIFETIME`] are clamped to it, so
    /// `Duration::MAX` means: read again only when the token is rejected or expires. A zero
    /// interval reads the file again whenever the layer can, at most once per failure
    /// back-off base of the layer (1 s by default).
    #[must_use]
    pub fn check_interval(mut self, interval: Duration) -> Self {
        self.check_interval = interval;
        self
    }

    /// The largest file, in bytes, that is read; a larger file is an error, and is not read.
    ///
    /// Default: 64 KiB. Whitespace around the token counts; the layer refuses header values
    /// longer than 32 KiB whatever this limit is.
    #[must_use]
    pub fn max_size(mut self, bytes: usize) -> Self {
        self.max_size = bytes;
        self
    }

    /// The path of the token file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl TokenSource for TokenFile {
    async fn fetch(&self, previous: Option<&Token>) -> Result<Token, Error> {
        let path = Arc::clone(&self.path);
        let max_size = self.max_size;

        let read = tokio::task::spawn_blocking(move || read_token(path, max_size)).await;
        let secret = match read {
            Ok(Ok(secret)) => secret,
            Ok(Err(err)) => {
                tracing::debug!(
                    error = %err,
                    cause = err.io.as_ref().map(tracing::field::display),
                    "token file unusable"
                );
                return Err(err.into_error());
            }
            // NOTE: the read never panics; it is cancelled only when the runtime shuts down.
            Err(_join_error) => return Err(Error::aborted()),
        };
        let now = Instant::now();
        // NOTE: a year from now does not overflow; the fallback only keeps this panic-free.
        let next_check = now
            .checked_add(self.check_interval.min(MAX_LIFETIME))
            .unwrap_or(now);

        if let Some(previous) = previous.filter(|p| p.expose_secret() == secret) {
            tracing::trace!(path = %self.path.display(), "token file unchanged");
            return Ok(previous.clone().with_refresh_at(next_check));
        }

        let lifetime = jwt_lifetime(&secret, SystemTime::now());
        let mut token = Token::new(secret).with_refresh_at(next_check);
        if let Some(lifetime) = lifetime {
            token = token.with_lifetime_from(now, lifetime);
        }
        tracing::debug!(
            path = %self.path.display(),
            first_read = previous.is_none(),
            jwt_exp = lifetime.is_some(),
            expires_in = ?token.expires_in(),
            "token file changed"
        );
        Ok(token)
    }
}

/// Reads and checks the token in the file at `path`. Blocks.
fn read_token(path: Arc<Path>, max_size: usize) -> Result<String, FileError> {
    let limit = u64::try_from(max_size).unwrap_or(u64::MAX);

    // NOTE: the type is checked before opening, because opening a FIFO would block until
    // something writes to it.
    let metadata = match std::fs::metadata(&path) {
        Ok(metadata) => metadata,
        Err(err) => return Err(FileError::io(path, err)),
    };
    if !metadata.is_file() {
        return Err(FileError::new(path, Problem::NotAFile));
    }
    if metadata.len() > limit {
        return Err(FileError::new(path, Problem::TooLarge { limit: max_size }));
    }

    let mut bytes = Vec::with_capacity(usize::try_from(metadata.len()).unwrap_or(0));
    let read = File::open(&path)
        .and_then(|file| file.take(limit.saturating_add(1)).read_to_end(&mut bytes));
    if let Err(err) = read {
        return Err(FileError::io(path, err));
    }

    // NOTE: the file may have grown since its size was looked at.
    if bytes.len() > max_size {
        return Err(FileError::new(path, Problem::TooLarge { limit: max_size }));
    }
    let Ok(text) = std::str::from_utf8(&bytes) else {
        return Err(FileError::new(path, Problem::NotUtf8));
    };
    let token = text.trim_ascii();
    if token.is_empty() {
        return Err(FileError::new(path, Problem::Empty));
    }
    if !token.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) {
        return Err(FileError::new(path, Problem::NotHeaderSafe));
    }
    Ok(token.to_owned())
}

/// What is wrong with the token file, named by its path; the source of the [`Error`] that the
/// layer gets. It never holds anything read from the file.
#[derive(Debug)]
struct FileError {
    path: Arc<Path>,
    problem: Problem,
    io: Option<io::Error>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Problem {
    Missing,
    Unreadable,
    NotAFile,
    TooLarge { limit: usize },
    NotUtf8,
    Empty,
    NotHeaderSafe,
}

impl FileError {
    fn new(path: Arc<Path>, problem: Problem) -> Self {
        Self {
            path,
            problem,
            io: None,
        }
    }

    fn io(path: Arc<Path>, err: io::Error) -> Self {
        let problem = match err.kind() {
            io::ErrorKind::NotFound => Problem::Missing,
            _ => Problem::Unreadable,
        };
        Self {
            path,
            problem,
            io: Some(err),
        }
    }

    /// The error the layer gets: transient when the file may still be on its way (missing,
    /// unreadable, empty), terminal when it holds something that is no token.
    fn into_error(self) -> Error {
        let (message, terminal) = match self.problem {
            Problem::Missing => ("it does not exist", false),
            Problem::Unreadable => ("it cannot be read", false),
            Problem::Empty => ("it is empty", false),
            Problem::NotAFile => ("it is not a regular file", true),
            Problem::TooLarge { .. } => ("it is larger than its size limit", true),
            Problem::NotUtf8 => ("it is not UTF-8", true),
            Problem::NotHeaderSafe => {
                ("it holds characters that are not allowed in a header", true)
            }
        };
        Error::file(message, terminal, self)
    }
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "token file {:?} ", self.path)?;
        match self.problem {
            Problem::Missing => f.write_str("does not exist"),
            Problem::Unreadable => f.write_str("cannot be read"),
            Problem::NotAFile => f.write_str("is not a regular file"),
            Problem::TooLarge { limit } => write!(f, "is larger than {limit} bytes"),
            Problem::NotUtf8 => f.write_str("is not UTF-8"),
            Problem::Empty => f.write_str("is empty"),
            Problem::NotHeaderSafe => {
                f.write_str("holds characters that are not allowed in a header")
            }
        }
    }
}

impl std::error::Error for FileError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.io
            .as_ref()
            .map(|err| err as &(dyn std::error::Error + 'static))
    }
}

/// The time left until the `exp` claim of `token`, read against the wall clock `now`: zero
/// when `exp` has passed, at most [`MAX_LIFETIME`]. `None` when `token` is not a JWT in JWS
/// compact form or has no numeric `exp`.
fn jwt_lifetime(token: &str, now: SystemTime) -> Option<Duration> {
    let exp = jwt_exp(token)?;

    let left = match now.duration_since(UNIX_EPOCH) {
        Ok(since_epoch) => exp - since_epoch.as_secs_f64(),
        Err(before_epoch) => exp + before_epoch.duration().as_secs_f64(),
    };

    // NOTE: `left` is finite (JSON has no infinities); a failed conversion means too long.
    let lifetime = if left > 0.0 {
        Duration::try_from_secs_f64(left).unwrap_or(MAX_LIFETIME)
    } else {
        Duration::ZERO
    };
    Some(lifetime.min(MAX_LIFETIME))
}

/// The `exp` claim of a JWS compact serialization, in seconds since the Unix epoch. The
/// signature is not checked.
fn jwt_exp(token: &str) -> Option<f64> {
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    if !signature.bytes().all(|b| sextet(b).is_some()) {
        return None;
    }

    let header: serde_json::Value = serde_json::from_slice(&decode_base64url(header)?).ok()?;
    if !header.is_object() {
        return None;
    }
    let payload: serde_json::Value = serde_json::from_slice(&decode_base64url(payload)?).ok()?;

    payload.get("exp")?.as_f64()
}

/// Decodes unpadded base64url (RFC 4648 §5), as JWS uses it. `None` for padding, characters
/// outside the alphabet, and lengths that no encoding has.
fn decode_base64url(text: &str) -> Option<Vec<u8>> {
    let input = text.as_bytes();
    if input.len() % 4 == 1 {
        return None;
    }

    let mut out = Vec::with_capacity(input.len() / 4 * 3 + 2);
    for chunk in input.chunks(4) {
        let mut bits: u32 = 0;
        for &c in chunk {
            bits = (bits << 6) | u32::from(sextet(c)?);
        }
        // NOTE: n characters carry 6n bits, of which the first 8(n-1) are whole bytes; the
        // leftover low bits of a short last chunk are ignored, not checked to be zero.
        match chunk.len() {
            4 => out.extend_from_slice(&bits.to_be_bytes()[1..]),
            3 => out.extend_from_slice(&(bits >> 2).to_be_bytes()[2..]),
            2 => out.push((bits >> 4).to_be_bytes()[3]),
            _ => unreachable!("a last chunk of one character was refused above"),
        }
    }
    Some(out)
}

/// The value of one base64url character.
fn sextet(c: u8) -> Option<u8> {
    match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'-' => Some(62),
        b'_' => Some(63),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;
    use tempfile::TempDir;

    /// A signed JWT with these claims.
    fn jwt(claims: &serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::default(),
            claims,
            &EncodingKey::from_secret(b"test key"),
        )
        .unwrap()
    }

    fn unix_now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    /// A folder holding a file `token` with `contents`, and a source that reads it.
    fn token_file(contents: impl AsRef<[u8]>) -> (TempDir, TokenFile) {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("token");
        std::fs::write(&path, contents).unwrap();
        (folder, TokenFile::new(path))
    }

    /// The error of a source reading `contents`.
    async fn error_for(contents: impl AsRef<[u8]>) -> Error {
        let (_folder, source) = token_file(contents);
        source.fetch(None).await.unwrap_err()
    }

    /// `err`'s Display and Debug, and the Display of each error in its source chain.
    fn everything_shown(err: &Error) -> String {
        let mut shown = format!("{err}\n{err:?}");
        let mut source = std::error::Error::source(err);
        while let Some(next) = source {
            shown.push_str(&format!("\n{next}\n{next:?}"));
            source = next.source();
        }
        shown
    }

    #[test]
    fn base64url_decodes_the_rfc_4648_vectors() {
        let vectors = [
            ("", ""),
            ("Zg", "f"),
            ("Zm8", "fo"),
            ("Zm9v", "foo"),
            ("Zm9vYg", "foob"),
            ("Zm9vYmE", "fooba"),
            ("Zm9vYmFy", "foobar"),
        ];

        for (encoded, decoded) in vectors {
            assert_eq!(
                decode_base64url(encoded).as_deref(),
                Some(decoded.as_bytes()),
                "{encoded}"
            );
        }
    }

    #[test]
    fn base64url_decodes_the_url_safe_alphabet() {
        assert_eq!(
            decode_base64url("-_-_").as_deref(),
            Some(&[0xfb, 0xff, 0xbf][..])
        );
        assert_eq!(
            decode_base64url("ABCDEFGHIJKLMNOP").as_deref(),
            Some(&[0x00, 0x10, 0x83, 0x10, 0x51, 0x87, 0x20, 0x92, 0x8b, 0x30, 0xd3, 0x8f][..])
        );
        assert_eq!(
            decode_base64url("eyJhbGciOiJub25lIn0").as_deref(),
            Some(&br#"{"alg":"none"}"#[..])
        );
    }

    #[test]
    fn base64url_refuses_padding_foreign_characters_and_impossible_lengths() {
        for encoded in ["Zg==", "Zm8=", "+/8", "Zm9v!", "Zm 9v", "Z", "Zm9vY", "é"] {
            assert_eq!(decode_base64url(encoded), None, "{encoded}");
        }
    }

    #[test]
    fn jwt_exp_is_read_from_the_payload_without_checking_the_signature() {
        let integer = "eyJhbGciOiJub25lIn0.eyJleHAiOjE3MDAwMDAwMDAsInN1YiI6IngifQ.";
        let fraction = "eyJhbGciOiJub25lIn0.eyJleHAiOjE3MDAwMDAwMDAuNX0.bm90LWEtc2lnbmF0dXJl";
        let signed = jwt(&json!({ "sub": "x", "exp": 1_800_000_000_u64 }));

        assert_eq!(jwt_exp(integer), Some(1_700_000_000.0));
        assert_eq!(jwt_exp(fraction), Some(1_700_000_000.5));
        assert_eq!(jwt_exp(&signed), Some(1_800_000_000.0));
    }

    #[test]
    fn tokens_that_are_no_jws_or_have_no_numeric_exp_have_no_expiry() {
        let header = "eyJhbGciOiJub25lIn0";
        let payload = "eyJleHAiOjE3MDAwMDAwMDAsInN1YiI6IngifQ";
        let not_jws = [
            "opaque-token".to_owned(),
            format!("{header}.{payload}"),
            format!("{header}.{payload}.sig.more.parts"),
            format!("{header}.{payload}.sig+nature"),
            format!("{header}=.{payload}.sig"),
            format!("bm90IGpzb24.{payload}.sig"),
            format!("WzFd.{payload}.sig"),
            format!("{header}..sig"),
            format!("{header}.bm90IGpzb24.sig"),
            jwt(&json!({ "sub": "no exp" })),
            jwt(&json!({ "exp": "1700000000" })),
            jwt(&json!({ "exp": null })),
        ];

        for token in &not_jws {
            assert_eq!(jwt_exp(token), None, "{token}");
            assert_eq!(jwt_lifetime(token, SystemTime::now()), None, "{token}");
        }
    }

    #[test]
    fn r2_jwt_lifetime_counts_from_the_wall_clock_and_saturates() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let at = |exp: serde_json::Value| jwt_lifetime(&jwt(&json!({ "exp": exp })), now);

        assert_eq!(at(json!(1_700_003_600)), Some(Duration::from_secs(3600)));
        assert_eq!(
            at(json!(1_700_000_000.25)),
            Some(Duration::from_millis(250))
        );
        assert_eq!(at(json!(1_700_000_000)), Some(Duration::ZERO));
        assert_eq!(at(json!(1_600_000_000)), Some(Duration::ZERO));
        assert_eq!(at(json!(-5)), Some(Duration::ZERO));
        assert_eq!(at(json!(u64::MAX)), Some(MAX_LIFETIME));
        assert_eq!(at(json!(1e300)), Some(MAX_LIFETIME));
        assert_eq!(
            jwt_lifetime(
                &jwt(&json!({ "exp": 10 })),
                UNIX_EPOCH - Duration::from_secs(5)
            ),
            Some(Duration::from_secs(15))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn reads_the_token_trimmed_and_asks_to_be_checked_after_the_interval() {
        let (_folder, source) = token_file(" \t opaque-token \r\n\n");
        let source = source.check_interval(Duration::from_secs(5));

        let token = source.fetch(None).await.unwrap();

        assert_eq!(token.expose_secret(), "opaque-token");
        assert_eq!(token.expires_at(), None);
        assert_eq!(
            token.refresh_at(),
            Some(Instant::now() + Duration::from_secs(5))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_check_interval_defaults_to_30_seconds_and_is_clamped() {
        let (_folder, source) = token_file("opaque-token");

        let default = source.fetch(None).await.unwrap();
        let longest = source
            .clone()
            .check_interval(Duration::MAX)
            .fetch(None)
            .await
            .unwrap();

        assert_eq!(
            default.refresh_at(),
            Some(Instant::now() + Duration::from_secs(30))
        );
        assert_eq!(longest.refresh_at(), Some(Instant::now() + MAX_LIFETIME));
    }

    #[tokio::test(start_paused = true)]
    async fn an_unchanged_file_gives_back_the_previous_token_checked_again_later() {
        let claims = json!({ "exp": unix_now() + 3600 });
        let (_folder, source) = token_file(jwt(&claims));
        let first = source.fetch(None).await.unwrap();

        tokio::time::advance(Duration::from_secs(31)).await;
        let second = source.fetch(Some(&first)).await.unwrap();

        assert_eq!(
            second.expose_secret().as_ptr(),
            first.expose_secret().as_ptr(),
            "the same secret, not a copy"
        );
        assert_eq!(second.expires_at(), first.expires_at());
        assert_eq!(
            second.refresh_at(),
            Some(Instant::now() + Duration::from_secs(30))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_changed_file_gives_a_new_token() {
        let (folder, source) = token_file("token-1");
        let first = source.fetch(None).await.unwrap();
        std::fs::write(folder.path().join("token"), "token-2\n").unwrap();

        let second = source.fetch(Some(&first)).await.unwrap();

        assert_eq!(second.expose_secret(), "token-2");
    }

    #[tokio::test(start_paused = true)]
    async fn r2_a_jwt_expires_at_its_exp() {
        let (_folder, source) =
            token_file(format!("{}\n", jwt(&json!({ "exp": unix_now() + 3600 }))));

        let token = source.fetch(None).await.unwrap();

        let expires_in = token.expires_in().unwrap();
        assert!(
            expires_in <= Duration::from_secs(3600) && expires_in > Duration::from_secs(3590),
            "{expires_in:?}"
        );
        assert!(token.refresh_at().is_some(), "still checked for changes");
    }

    #[tokio::test(start_paused = true)]
    async fn r2_a_jwt_whose_exp_has_passed_is_expired_on_arrival() {
        let (_folder, source) = token_file(jwt(&json!({ "exp": unix_now() - 60 })));

        let token = source.fetch(None).await.unwrap();

        assert_eq!(token.expires_in(), Some(Duration::ZERO));
    }

    #[tokio::test]
    async fn a_missing_file_is_a_transient_source_error_naming_the_path() {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("not-written-yet");

        let err = TokenFile::new(&path).fetch(None).await.unwrap_err();

        assert!(err.is_file() && err.is_transient(), "{err:?}");
        let file_error = std::error::Error::source(&err).unwrap();
        assert_eq!(
            file_error.to_string(),
            format!("token file {path:?} does not exist")
        );
        let io = file_error.source().unwrap().downcast_ref::<io::Error>();
        assert_eq!(io.map(io::Error::kind), Some(io::ErrorKind::NotFound));
    }

    #[tokio::test]
    async fn an_empty_file_is_a_transient_source_error() {
        for contents in ["", " \r\n\t\n"] {
            let err = error_for(contents).await;

            assert!(err.is_file() && err.is_transient(), "{err:?}");
            assert!(
                std::error::Error::source(&err)
                    .unwrap()
                    .to_string()
                    .ends_with("is empty"),
                "{err:?}"
            );
        }
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn an_unreadable_file_is_a_transient_source_error() {
        use std::os::unix::fs::PermissionsExt;

        let (folder, _source) = token_file("opaque-token");
        let locked = folder.path().join("token");
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o000)).unwrap();
        // NOTE: permissions do not stop a privileged user; a path through a file fails for all.
        let mut paths = vec![folder.path().join("token/below-a-file")];
        if std::fs::read(&locked).is_err() {
            paths.push(locked);
        }

        for path in paths {
            let err = TokenFile::new(&path).fetch(None).await.unwrap_err();

            assert!(err.is_file() && err.is_transient(), "{err:?}");
            let file_error = std::error::Error::source(&err).unwrap();
            assert_eq!(
                file_error.to_string(),
                format!("token file {path:?} cannot be read")
            );
            assert!(file_error.source().unwrap().is::<io::Error>());
        }
    }

    #[tokio::test]
    async fn a_folder_is_a_terminal_config_error() {
        let folder = tempfile::tempdir().unwrap();

        let err = TokenFile::new(folder.path()).fetch(None).await.unwrap_err();

        assert!(err.is_file() && err.is_terminal(), "{err:?}");
        assert_eq!(
            err.to_string(),
            "token file cannot be used: it is not a regular file"
        );
    }

    #[tokio::test]
    async fn a_file_over_the_size_limit_is_refused_and_one_at_the_limit_is_read() {
        let (_folder, source) = token_file("0123456789\n");

        let over = source.clone().max_size(10).fetch(None).await.unwrap_err();
        let at = source.clone().max_size(11).fetch(None).await.unwrap();

        assert!(over.is_file() && over.is_terminal(), "{over:?}");
        assert_eq!(
            over.to_string(),
            "token file cannot be used: it is larger than its size limit"
        );
        assert_eq!(at.expose_secret(), "0123456789");
    }

    #[tokio::test]
    async fn a_file_that_is_not_utf8_is_an_invalid_token() {
        let err = error_for([b'o', b'k', 0xff, 0xfe]).await;

        assert!(err.is_file() && err.is_terminal(), "{err:?}");
        assert_eq!(
            err.to_string(),
            "token file cannot be used: it is not UTF-8"
        );
    }

    #[tokio::test]
    async fn characters_not_allowed_in_a_header_are_an_invalid_token() {
        for contents in [
            "two\nlines",
            "nul\0byte",
            "tab\tinside",
            "tökén",
            "\u{feff}with-bom",
        ] {
            let err = error_for(contents).await;

            assert!(err.is_file() && err.is_terminal(), "{err:?}");
            assert_eq!(
                err.to_string(),
                "token file cannot be used: it holds characters that are not allowed in a header"
            );
        }
    }

    #[tokio::test]
    async fn r10_errors_never_show_what_the_file_holds() {
        let secret = "s3cr3t-Ünïcode-token";
        let big = format!("s3cr3t-{}", "x".repeat(DEFAULT_MAX_SIZE));
        let cases: [(&str, Vec<u8>); 4] = [
            ("s3cr3t", [b"s3cr3t".as_slice(), &[0xff]].concat()),
            ("s3cr3t", b"s3cr3t\nsecond line".to_vec()),
            ("s3cr3t", secret.as_bytes().to_vec()),
            ("s3cr3t", big.into_bytes()),
        ];

        for (needle, contents) in cases {
            let (_folder, source) = token_file(&contents);
            let err = source.fetch(None).await.unwrap_err();

            let shown = everything_shown(&err);
            assert!(!shown.contains(needle), "{shown}");
            assert!(shown.contains(&format!("{:?}", source.path())), "{shown}");
        }
    }
}
