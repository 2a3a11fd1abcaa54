//! The token request: its form body (RFC 6749 Appendix B) and client authentication (§2.3.1).
//!
//! What a request holds apart from per-fetch parameters (the refresh token of a refresh-token
//! grant) is known when the source is built, so it is encoded once and copied for every fetch.

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Uri};
use http_body_util::Full;

/// How the client proves its identity to the token endpoint (RFC 6749 §2.3.1).
///
/// A source without a client secret (a public client, which only a
/// [`RefreshTokenGrant`](super::RefreshTokenGrant) can be) sends its `client_id` as a form
/// parameter and no credentials, whatever this says.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientAuth {
    /// An `Authorization: Basic` header holding the client id and secret, each
    /// form-urlencoded first, as RFC 6749 §2.3.1 requires (`client_secret_basic`). The default.
    ///
    /// Some servers forget to decode the id and secret; if yours rejects a secret that holds
    /// characters such as `+`, `%`, `:` or spaces, try [`ClientAuth::RequestBody`].
    #[default]
    Basic,
    /// `client_id` and `client_secret` as form parameters of the request body
    /// (`client_secret_post`).
    RequestBody,
}

/// The parts of a token request that never change between fetches.
pub(super) struct TokenRequest {
    uri: Uri,
    headers: HeaderMap,
    /// The form-urlencoded body without the per-fetch parameters.
    body: String,
    /// Where per-fetch parameters go in `body`: right after `grant_type`.
    insert_at: usize,
}

impl TokenRequest {
    /// Encodes a request of the grant `grant_type`.
    ///
    /// The body is `grant_type`, then the per-fetch parameters given to
    /// [`to_http_with`](Self::to_http_with), then `params` in order, then the client's
    /// credentials when they travel in the body: `client_id` and `client_secret` with
    /// [`ClientAuth::RequestBody`], `client_id` alone without a secret. `extra_headers`
    /// replace the headers of the same name that the request would otherwise carry.
    pub(super) fn new(
        uri: Uri,
        grant_type: &str,
        client_id: &str,
        client_secret: Option<&str>,
        client_auth: ClientAuth,
        params: &[(String, String)],
        extra_headers: &HeaderMap,
    ) -> Self {
        let mut form = Form::default();
        form.push("grant_type", grant_type);
        let insert_at = form.encoded.len();
        for (name, value) in params {
            form.push(name, value);
        }

        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        match (client_secret, client_auth) {
            (None, _) => form.push("client_id", client_id),
            (Some(client_secret), ClientAuth::Basic) => {
                headers.insert(
                    header::AUTHORIZATION,
                    basic_authorization(client_id, client_secret),
                );
            }
            (Some(client_secret), ClientAuth::RequestBody) => {
                form.push("client_id", client_id);
                form.push("client_secret", client_secret);
            }
        }
        for name in extra_headers.keys() {
            headers.remove(name);
        }
        for (name, value) in extra_headers {
            headers.append(name, value.clone());
        }

        Self {
            uri,
            headers,
            body: form.encoded,
            insert_at,
        }
    }

    /// The token endpoint's URL.
    pub(super) fn uri(&self) -> &Uri {
        &self.uri
    }

    /// A fresh copy of the request, ready to send.
    #[cfg(test)]
    pub(super) fn to_http(&self) -> Request<Full<Bytes>> {
        self.to_http_with(&[])
    }

    /// A fresh copy of the request with `params` after `grant_type`, ready to send.
    pub(super) fn to_http_with(&self, params: &[(&str, &str)]) -> Request<Full<Bytes>> {
        let body = if params.is_empty() {
            self.body.clone()
        } else {
            let (head, tail) = self.body.split_at(self.insert_at);
            let mut form = Form {
                encoded: String::with_capacity(self.body.len() + 64),
            };
            form.encoded.push_str(head);
            for (name, value) in params {
                form.push(name, value);
            }
            form.encoded.push_str(tail);
            form.encoded
        };

        let mut request = Request::new(Full::new(Bytes::from(body)));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = self.uri.clone();
        *request.headers_mut() = self.headers.clone();
        request
    }
}

/// The value of an `Authorization: Basic` header for a client, marked sensitive.
pub(super) fn basic_authorization(client_id: &str, client_secret: &str) -> HeaderValue {
    let mut value = String::from("Basic ");
    value.push_str(&basic_credentials(client_id, client_secret));

    // NOTE: "Basic " and the base64 alphabet are visible ASCII, always a valid header value.
    let mut value = HeaderValue::try_from(value).expect("base64 is a valid header value");
    value.set_sensitive(true);
    value
}

/// The base64 part of a Basic header: `base64(urlencode(id) ":" urlencode(secret))`.
pub(super) fn basic_credentials(client_id: &str, client_secret: &str) -> String {
    let mut pair = form_urlencode(client_id);
    pair.push(':');
    form_urlencode_into(&mut pair, client_secret);
    base64_encode(pair.as_bytes())
}

/// An `application/x-www-form-urlencoded` body under construction.
#[derive(Default)]
struct Form {
    encoded: String,
}

impl Form {
    fn push(&mut self, name: &str, value: &str) {
        if !self.encoded.is_empty() {
            self.encoded.push('&');
        }
        form_urlencode_into(&mut self.encoded, name);
        self.encoded.push('=');
        form_urlencode_into(&mut self.encoded, value);
    }
}

/// Form-urlencodes `input` (RFC 6749 Appendix B).
pub(super) fn form_urlencode(input: &str) -> String {
    let mut out = String::with_capacity(input.len());
    form_urlencode_into(&mut out, input);
    out
}

/// Appends `input` to `out`, form-urlencoded: its UTF-8 bytes stay as they are when they are
/// ASCII letters, digits or one of `*-._`, a space becomes `+`, every other byte becomes
/// `%XX` with upper-case hex digits.
fn form_urlencode_into(out: &mut String, input: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";

    for &byte in input.as_bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'*' | b'-' | b'.' | b'_' => {
                out.push(char::from(byte));
            }
            b' ' => out.push('+'),
            _ => {
                out.push('%');
                out.push(char::from(HEX[usize::from(byte >> 4)]));
                out.push(char::from(HEX[usize::from(byte & 0x0f)]));
            }
        }
    }
}

/// Encodes `input` in standard base64 with padding (RFC 4648 §4), as HTTP Basic uses it.
pub(super) fn base64_encode(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b0 = chunk[0];
        let b1 = chunk.get(1).copied().unwrap_or(0);
        let b2 = chunk.get(2).copied().unwrap_or(0);
        let group = (u32::from(b0) << 16) | (u32::from(b1) << 8) | u32::from(b2);

        // NOTE: a chunk of n bytes fills n + 1 sextets; the rest of the four is padding.
        for (index, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            if index <= chunk.len() {
                out.push(char::from(ALPHABET[((group >> shift) & 0x3f) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_urlencode_keeps_unreserved_bytes() {
        assert_eq!(
            form_urlencode("AZaz09*-._"),
            "AZaz09*-._",
            "letters, digits and *-._ pass through"
        );
    }

    #[test]
    fn form_urlencode_turns_spaces_into_plus() {
        assert_eq!(form_urlencode("read write"), "read+write");
    }

    #[test]
    fn form_urlencode_percent_encodes_everything_else_in_upper_case() {
        assert_eq!(
            form_urlencode("a+b%c:d/e~f&g=h"),
            "a%2Bb%25c%3Ad%2Fe%7Ef%26g%3Dh"
        );
        assert_eq!(form_urlencode("\n\u{7f}"), "%0A%7F");
    }

    #[test]
    fn form_urlencode_encodes_non_ascii_as_utf8_bytes() {
        assert_eq!(form_urlencode("é€"), "%C3%A9%E2%82%AC");
    }

    #[test]
    fn form_urlencode_of_empty_is_empty() {
        assert_eq!(form_urlencode(""), "");
    }

    #[test]
    fn base64_matches_rfc_4648_test_vectors() {
        let vectors = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];

        for (input, expected) in vectors {
            assert_eq!(base64_encode(input.as_bytes()), expected, "{input:?}");
        }
    }

    #[test]
    fn base64_uses_the_standard_alphabet_for_high_bytes() {
        assert_eq!(base64_encode(&[0xfb, 0xff, 0xbf]), "+/+/");
        assert_eq!(base64_encode(&[0x00, 0x00, 0x00]), "AAAA");
    }

    #[test]
    fn basic_credentials_of_plain_id_and_secret() {
        assert_eq!(
            basic_credentials("my-client", "my-secret"),
            "bXktY2xpZW50Om15LXNlY3JldA=="
        );
    }

    #[test]
    fn basic_credentials_form_urlencode_id_and_secret_before_base64() {
        // base64("client%3A1+%2B%25%2F%C3%A9:p%40ss+w%3Ard%2B%25%7E*%C3%BC")
        let expected =
            "Y2xpZW50JTNBMSslMkIlMjUlMkYlQzMlQTk6cCU0MHNzK3clM0FyZCUyQiUyNSU3RSolQzMlQkM=";

        assert_eq!(
            basic_credentials("client:1 +%/é", "p@ss w:rd+%~*ü"),
            expected
        );
    }

    #[test]
    fn basic_authorization_header_is_sensitive() {
        let value = basic_authorization("my-client", "my-secret");

        assert_eq!(value, "Basic bXktY2xpZW50Om15LXNlY3JldA==");
        assert!(value.is_sensitive());
    }

    #[test]
    fn request_body_auth_puts_credentials_last_in_the_form() {
        let params = [("scope".to_owned(), "read write".to_owned())];

        let request = TokenRequest::new(
            Uri::from_static("https://auth.example.com/token"),
            "client_credentials",
            "id 1",
            Some("s+cret"),
            ClientAuth::RequestBody,
            &params,
            &HeaderMap::new(),
        );

        assert_eq!(
            request.body,
            "grant_type=client_credentials&scope=read+write&client_id=id+1&client_secret=s%2Bcret"
        );
        assert!(!request.headers.contains_key(header::AUTHORIZATION));
    }

    #[test]
    fn public_client_sends_its_id_last_in_the_form_and_no_authorization() {
        let params = [("scope".to_owned(), "read".to_owned())];

        let request = TokenRequest::new(
            Uri::from_static("https://auth.example.com/token"),
            "refresh_token",
            "app 1",
            None,
            ClientAuth::Basic,
            &params,
            &HeaderMap::new(),
        );

        assert_eq!(
            request.body,
            "grant_type=refresh_token&scope=read&client_id=app+1"
        );
        assert!(!request.headers.contains_key(header::AUTHORIZATION));
    }

    #[tokio::test]
    async fn per_fetch_params_follow_the_grant_type_and_are_encoded() {
        let params = [("scope".to_owned(), "read".to_owned())];
        let request = TokenRequest::new(
            Uri::from_static("https://auth.example.com/token"),
            "refresh_token",
            "id",
            Some("secret"),
            ClientAuth::RequestBody,
            &params,
            &HeaderMap::new(),
        );

        let with = request.to_http_with(&[("refresh_token", "r+1 /")]);
        let without = request.to_http();

        let body = |request: Request<Full<Bytes>>| async {
            use http_body_util::BodyExt;
            request.into_body().collect().await.unwrap().to_bytes()
        };
        assert_eq!(
            body(with).await,
            "grant_type=refresh_token&refresh_token=r%2B1+%2F&scope=read\
             &client_id=id&client_secret=secret"
        );
        assert_eq!(
            body(without).await,
            "grant_type=refresh_token&scope=read&client_id=id&client_secret=secret"
        );
    }

    #[test]
    fn extra_headers_replace_default_headers_of_the_same_name() {
        let mut extra = HeaderMap::new();
        extra.insert(header::ACCEPT, HeaderValue::from_static("application/jwt"));
        extra.append("x-tenant", HeaderValue::from_static("a"));
        extra.append("x-tenant", HeaderValue::from_static("b"));

        let request = TokenRequest::new(
            Uri::from_static("https://auth.example.com/token"),
            "client_credentials",
            "id",
            Some("secret"),
            ClientAuth::Basic,
            &[],
            &extra,
        )
        .to_http();

        let accept: Vec<_> = request.headers().get_all(header::ACCEPT).iter().collect();
        assert_eq!(accept, ["application/jwt"]);
        let tenants: Vec<_> = request.headers().get_all("x-tenant").iter().collect();
        assert_eq!(tenants, ["a", "b"]);
    }
}
