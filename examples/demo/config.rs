//! Flags and environment variables, parsed by hand so that the demo needs no argument parser.
//!
//! Every flag has an environment variable (`--token-url` is `DEMO_TOKEN_URL`, and so on); a
//! flag on the command line wins over the variable, and an empty variable counts as unset.

use std::{ffi::OsString, time::Duration};

use http::Uri;
use tower_token_refresh::source::oauth2::ClientAuth;

/// The client the embedded token endpoint knows, and the credentials sent by default.
pub(crate) const DEFAULT_CLIENT_ID: &str = "demo-client";
pub(crate) const DEFAULT_CLIENT_SECRET: &str = "demo-secret";

const DEFAULT_CONCURRENCY: usize = 64;
const MAX_CONCURRENCY: usize = 10_000;
const DEFAULT_DURATION: Duration = Duration::from_secs(6);
const MIN_DURATION: Duration = Duration::from_millis(100);
const MAX_DURATION: Duration = Duration::from_secs(3600);

/// What the user asked for.
pub(crate) enum Command {
    Run(Box<Config>),
    Help,
}

/// The OAuth2 grant the demo's client uses to get its tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GrantType {
    /// RFC 6749 §4.4: the client's own credentials buy each token.
    ClientCredentials,
    /// RFC 6749 §6: each token comes for the refresh token that came with the one before.
    RefreshToken,
}

impl GrantType {
    /// The `grant_type` value of the grant, as the summary names it.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::ClientCredentials => "client_credentials",
            Self::RefreshToken => "refresh_token",
        }
    }
}

/// A checked configuration.
#[derive(Debug)]
pub(crate) struct Config {
    /// `None`: start the embedded token endpoint.
    pub(crate) token_url: Option<Uri>,
    pub(crate) grant: GrantType,
    /// The refresh token to start from, with [`GrantType::RefreshToken`]. `None` with that
    /// grant: the embedded token endpoint is seeded with a random one (never `None` with an
    /// external token endpoint).
    pub(crate) refresh_token: Option<String>,
    pub(crate) client_id: String,
    pub(crate) client_secret: String,
    pub(crate) client_auth: ClientAuth,
    pub(crate) scope: Option<String>,
    /// `None`: start the embedded API. Otherwise a base URL without a trailing slash.
    pub(crate) api_url: Option<String>,
    pub(crate) concurrency: usize,
    pub(crate) duration: Duration,
}

/// The flags, each with its environment variable. Every flag takes a value.
const FLAGS: [(&str, &str); 10] = [
    ("--token-url", "DEMO_TOKEN_URL"),
    ("--grant", "DEMO_GRANT"),
    ("--refresh-token", "DEMO_REFRESH_TOKEN"),
    ("--client-id", "DEMO_CLIENT_ID"),
    ("--client-secret", "DEMO_CLIENT_SECRET"),
    ("--client-auth", "DEMO_CLIENT_AUTH"),
    ("--scope", "DEMO_SCOPE"),
    ("--api-url", "DEMO_API_URL"),
    ("--concurrency", "DEMO_CONCURRENCY"),
    ("--duration", "DEMO_DURATION"),
];

pub(crate) const USAGE: &str = "\
Runs tower-token-refresh end to end: an embedded OAuth2 token endpoint issuing 2-second
tokens, a protected API that revokes every token now and then, and many concurrent calls
through RefreshLayer over a hyper-util client. Prints a summary; the last line is JSON.

USAGE:
    cargo run --example demo -- [FLAGS]

FLAGS (each also read from the environment variable shown):
    --token-url URL        DEMO_TOKEN_URL       use this token endpoint instead of the
                                                embedded one (plain http, and only to a
                                                loopback address: the demo has no TLS)
    --grant GRANT          DEMO_GRANT           client_credentials or refresh_token;
                                                refresh_token without --refresh-token
                                                seeds the embedded token endpoint with a
                                                random refresh token to start from
                                                [default: refresh_token with
                                                --refresh-token, else client_credentials]
    --refresh-token TOKEN  DEMO_REFRESH_TOKEN   get tokens with the refresh-token grant,
                                                starting from TOKEN; the embedded token
                                                endpoint is seeded with it, so any value
                                                works, such as demo-refresh-1
    --client-id ID         DEMO_CLIENT_ID       client id [default: demo-client]
    --client-secret SECRET DEMO_CLIENT_SECRET   client secret [default: demo-secret]
                                                (the embedded token endpoint knows only
                                                the default client and refuses others)
    --client-auth METHOD   DEMO_CLIENT_AUTH     basic (HTTP Basic) or post (form body)
                                                [default: basic]
    --scope SCOPES         DEMO_SCOPE           space-separated scopes to ask for; the
                                                embedded servers know orders:read (GET)
                                                and orders:write (POST)
                                                [default: none, the server's default]
    --api-url URL          DEMO_API_URL         call this API instead of the embedded one:
                                                GET URL/orders/<n>, POST URL/orders
    --concurrency N        DEMO_CONCURRENCY     concurrent callers, 1 to 10000 [default: 64]
    --duration SECONDS     DEMO_DURATION        how long to call, fractions allowed,
                                                0.1 to 3600 [default: 6]
    -h, --help                                  print this help

Flags win over environment variables. RUST_LOG sets the log filter (default: warn); logs
go to stderr.

THE REFRESH-TOKEN GRANT:
    With --refresh-token or --grant refresh_token the client trades a refresh token for
    each token (RFC 6749 section 6), authenticating with the client id, secret and client
    auth method above. The embedded token endpoint rotates refresh tokens: each answer
    brings a new one with a 2-second access token, and a refresh token used before is
    refused (400 invalid_grant). The demo subscribes to the tokens the layer installs, as
    an application that saves each rotated refresh token would, and counts the rotations
    it sees. With --token-url the demo starts from the refresh token given, and the checks
    that need the embedded token endpoint's counts are skipped.

EXIT STATUS:
    0  every call succeeded and the token endpoint was called no more often than token
       lifetimes and revocations explain; with the refresh-token grant also no refresh
       token was refused, and the subscriber saw every rotation the endpoint made
    1  a check failed (the reason is printed on stderr)
    2  a flag or variable has a bad value
";

/// A flag or variable with a bad value; exit code 2.
#[derive(Debug)]
pub(crate) struct UsageError(pub(crate) String);

/// Reads the command line `args` (without the program name) and the variables `env` yields.
pub(crate) fn parse(
    args: impl IntoIterator<Item = OsString>,
    env: impl Fn(&str) -> Option<OsString>,
) -> Result<Command, UsageError> {
    let mut raw: Vec<Option<(String, String)>> = vec![None; FLAGS.len()];

    for (index, (_, variable)) in FLAGS.iter().enumerate() {
        if let Some(value) = env(variable) {
            let value = utf8(value, variable)?;
            if !value.is_empty() {
                raw[index] = Some(((*variable).to_owned(), value));
            }
        }
    }

    // Flags come second, so that they override the environment.
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let arg = utf8(arg, "a command-line argument")?;
        if arg == "-h" || arg == "--help" {
            return Ok(Command::Help);
        }
        let (name, inline_value) = match arg.split_once('=') {
            Some((name, value)) => (name.to_owned(), Some(value.to_owned())),
            None => (arg, None),
        };
        let Some(index) = FLAGS.iter().position(|(flag, _)| *flag == name) else {
            return Err(UsageError(format!("unknown argument {name:?}")));
        };
        let value = match inline_value {
            Some(value) => value,
            None => match args.next() {
                Some(value) => utf8(value, &name)?,
                None => return Err(UsageError(format!("{name} needs a value"))),
            },
        };
        raw[index] = Some((name, value));
    }

    // Each value comes with where it came from (flag or variable), for error messages.
    let value = |flag: &str| {
        let index = FLAGS
            .iter()
            .position(|(f, _)| *f == flag)
            .expect("a known flag");
        raw[index]
            .as_ref()
            .map(|(from, v)| (from.as_str(), v.as_str()))
    };
    let refresh_token = value("--refresh-token").map(refresh_token).transpose()?;
    let grant = grant(
        value("--grant"),
        value("--refresh-token"),
        value("--token-url"),
    )?;
    Ok(Command::Run(Box::new(Config {
        token_url: value("--token-url").map(token_url).transpose()?,
        grant,
        refresh_token,
        client_id: value("--client-id").map_or(Ok(DEFAULT_CLIENT_ID.to_owned()), client_id)?,
        client_secret: value("--client-secret")
            .map_or(DEFAULT_CLIENT_SECRET, |(_, v)| v)
            .to_owned(),
        client_auth: value("--client-auth").map_or(Ok(ClientAuth::Basic), client_auth)?,
        scope: value("--scope")
            .map(scope)
            .transpose()?
            .filter(|s| !s.is_empty()),
        api_url: value("--api-url").map(api_url).transpose()?,
        concurrency: value("--concurrency").map_or(Ok(DEFAULT_CONCURRENCY), concurrency)?,
        duration: value("--duration").map_or(Ok(DEFAULT_DURATION), duration)?,
    })))
}

fn utf8(value: OsString, from: &str) -> Result<String, UsageError> {
    value
        .into_string()
        .map_err(|_| UsageError(format!("{from} is not valid UTF-8")))
}

/// A URL with an `http` or `https` scheme and a host, without user info.
fn absolute_url(from: &str, text: &str, schemes: &[&str]) -> Result<Uri, UsageError> {
    let bad = |why: &str| UsageError(format!("{from}: {why}, got {text:?}"));

    let uri: Uri = text.parse().map_err(|_| bad("not a valid URL"))?;
    let scheme = uri.scheme_str().unwrap_or_default();
    if !schemes.contains(&scheme) {
        return Err(bad(&format!(
            "the URL must start with {}://",
            schemes.join(":// or ")
        )));
    }
    let Some(authority) = uri.authority() else {
        return Err(bad("the URL has no host"));
    };
    if authority.as_str().contains('@') || authority.host().is_empty() {
        return Err(bad("the URL needs a host and no user info"));
    }
    Ok(uri)
}

fn token_url((from, text): (&str, &str)) -> Result<Uri, UsageError> {
    // NOTE: https is let through here so that the token source can say why it cannot use it
    // (its default transport speaks plain http only).
    absolute_url(from, text, &["http", "https"])
}

fn api_url((from, text): (&str, &str)) -> Result<String, UsageError> {
    // The demo's API client is hyper-util's plain HTTP client, without TLS.
    let uri = absolute_url(from, text, &["http"])?;
    if uri.query().is_some() {
        return Err(UsageError(format!(
            "{from}: a base URL without a query is needed, got {text:?}"
        )));
    }
    Ok(uri.to_string().trim_end_matches('/').to_owned())
}

/// The grant named, or the one a refresh token asks for; refused when it contradicts the
/// refresh token given, or needs one the demo cannot make up.
fn grant(
    named: Option<(&str, &str)>,
    refresh_token: Option<(&str, &str)>,
    token_url: Option<(&str, &str)>,
) -> Result<GrantType, UsageError> {
    let grant = match named {
        None if refresh_token.is_some() => GrantType::RefreshToken,
        None => GrantType::ClientCredentials,
        Some((from, text)) => match text.to_ascii_lowercase().as_str() {
            "client_credentials" => GrantType::ClientCredentials,
            "refresh_token" => GrantType::RefreshToken,
            _ => {
                return Err(UsageError(format!(
                    "{from}: expected client_credentials or refresh_token, got {text:?}"
                )))
            }
        },
    };

    match (grant, refresh_token, token_url) {
        (GrantType::ClientCredentials, Some((from, _)), _) => Err(UsageError(format!(
            "{from} is for the refresh_token grant, but {} names client_credentials",
            named.map_or("--grant", |(from, _)| from)
        ))),
        (GrantType::RefreshToken, None, Some((from, _))) => Err(UsageError(format!(
            "the refresh_token grant with {from} needs --refresh-token: only the embedded \
             token endpoint can be seeded with a refresh token the demo makes up"
        ))),
        _ => Ok(grant),
    }
}

/// A refresh token of the characters RFC 6749 allows (Appendix A.17: printable ASCII).
fn refresh_token((from, text): (&str, &str)) -> Result<String, UsageError> {
    if text.is_empty() {
        return Err(UsageError(format!("{from}: the refresh token is empty")));
    }
    if !text.chars().all(|c| (' '..='~').contains(&c)) {
        return Err(UsageError(format!(
            "{from}: a refresh token is printable ASCII, spaces allowed"
        )));
    }
    Ok(text.to_owned())
}

fn client_id((from, text): (&str, &str)) -> Result<String, UsageError> {
    if text.chars().any(char::is_control) {
        return Err(UsageError(format!(
            "{from}: control characters are not allowed"
        )));
    }
    Ok(text.to_owned())
}

fn client_auth((from, text): (&str, &str)) -> Result<ClientAuth, UsageError> {
    match text.to_ascii_lowercase().as_str() {
        "basic" => Ok(ClientAuth::Basic),
        "post" => Ok(ClientAuth::RequestBody),
        _ => Err(UsageError(format!(
            "{from}: expected basic or post, got {text:?}"
        ))),
    }
}

/// Space-separated scope tokens of the characters RFC 6749 §3.3 allows.
fn scope((from, text): (&str, &str)) -> Result<String, UsageError> {
    let allowed = |c: char| c == '!' || ('#'..='[').contains(&c) || (']'..='~').contains(&c);
    if !text.split(' ').flat_map(str::chars).all(allowed) {
        return Err(UsageError(format!(
            "{from}: scopes are printable ASCII without '\"' or '\\', separated by spaces, \
             got {text:?}"
        )));
    }
    Ok(text.split_ascii_whitespace().collect::<Vec<_>>().join(" "))
}

fn concurrency((from, text): (&str, &str)) -> Result<usize, UsageError> {
    match text.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_CONCURRENCY).contains(&n) => Ok(n),
        _ => Err(UsageError(format!(
            "{from}: expected a whole number from 1 to {MAX_CONCURRENCY}, got {text:?}"
        ))),
    }
}

fn duration((from, text): (&str, &str)) -> Result<Duration, UsageError> {
    let seconds = text.trim().parse::<f64>().ok();
    match seconds.and_then(|s| Duration::try_from_secs_f64(s).ok()) {
        Some(d) if (MIN_DURATION..=MAX_DURATION).contains(&d) => Ok(d),
        _ => Err(UsageError(format!(
            "{from}: expected seconds from {} to {}, such as 6 or 2.5, got {text:?}",
            MIN_DURATION.as_secs_f64(),
            MAX_DURATION.as_secs()
        ))),
    }
}
