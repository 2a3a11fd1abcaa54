//! The HTTP client a source reaches its token endpoint with: any tower HTTP service, its type
//! erased, and the default one.

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body::Body;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use tower::{util::BoxCloneSyncService, Service, ServiceExt};

use crate::{BoxError, Error};

/// A response body of any transport.
pub(super) type ResponseBody = UnsyncBoxBody<Bytes, BoxError>;

/// A transport with its type erased.
pub(super) type Transport =
    BoxCloneSyncService<Request<Full<Bytes>>, Response<ResponseBody>, BoxError>;

/// Erases the type of a tower HTTP service.
pub(super) fn erase<S, B>(service: S) -> Transport
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let service = service
        .map_response(|response: Response<B>| {
            response.map(|body| body.map_err(Into::into).boxed_unsync())
        })
        .map_err(Into::into);
    BoxCloneSyncService::new(service)
}

/// The default transport: hyper-util's pooled HTTP/1 client, without TLS.
#[cfg(feature = "hyper-client")]
pub(super) fn default_transport() -> Transport {
    use hyper_util::{
        client::legacy::{connect::HttpConnector, Client},
        rt::TokioExecutor,
    };

    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    erase(client)
}

/// The default transport for `token_url`, or why there is none.
#[cfg(feature = "hyper-client")]
pub(super) fn default_for(token_url: &Uri) -> Result<Transport, Error> {
    if token_url.scheme_str() != Some("http") {
        return Err(Error::config(
            "the default transport speaks plain http only; pass a TLS-capable client to \
             transport() for an https token URL",
        ));
    }
    Ok(default_transport())
}

/// The default transport for `token_url`, or why there is none.
#[cfg(not(feature = "hyper-client"))]
pub(super) fn default_for(_token_url: &Uri) -> Result<Transport, Error> {
    Err(Error::config(
        "no transport: pass one to transport() or enable the hyper-client feature",
    ))
}

/// Why a response body could not be read.
pub(super) enum ReadError {
    /// The body is longer than the limit.
    TooLarge,
    /// The body broke off.
    Body(BoxError),
}

/// Reads a whole body, refusing one longer than `limit` bytes without reading on.
pub(super) async fn read_body(mut body: ResponseBody, limit: usize) -> Result<Vec<u8>, ReadError> {
    let limit_u64 = u64::try_from(limit).unwrap_or(u64::MAX);
    if body.size_hint().lower() > limit_u64 {
        return Err(ReadError::TooLarge);
    }

    let mut collected = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(ReadError::Body)?;
        if let Ok(data) = frame.into_data() {
            if collected.len() + data.len() > limit {
                return Err(ReadError::TooLarge);
            }
            collected.extend_from_slice(&data);
        }
    }
    Ok(collected)
}

#[cfg(test)]
pub(super) mod tests {
    use std::{
        collections::VecDeque,
        convert::Infallible,
        pin::Pin,
        task::{Context, Poll},
    };

    use http_body::Frame;

    use super::*;

    /// A body that arrives in the given pieces and does not tell its length up front.
    pub(crate) struct Chunks(pub(crate) VecDeque<Result<Bytes, BoxError>>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(
                self.get_mut()
                    .0
                    .pop_front()
                    .map(|chunk| chunk.map(Frame::data)),
            )
        }
    }

    pub(crate) fn chunks<const N: usize>(pieces: [&'static str; N]) -> Chunks {
        Chunks(
            pieces
                .into_iter()
                .map(|piece| Ok(Bytes::from(piece)))
                .collect(),
        )
    }

    fn boxed(body: impl Body<Data = Bytes, Error = BoxError> + Send + 'static) -> ResponseBody {
        body.boxed_unsync()
    }

    #[tokio::test]
    async fn read_body_joins_the_chunks() {
        let body = boxed(chunks(["{\"a\":", "1}"]));

        let read = read_body(body, 64).await;

        assert_eq!(read.ok().as_deref(), Some(&b"{\"a\":1}"[..]));
    }

    #[tokio::test]
    async fn read_body_accepts_exactly_the_limit() {
        let body = boxed(chunks(["12345", "678"]));

        let read = read_body(body, 8).await;

        assert_eq!(read.ok().map(|body| body.len()), Some(8));
    }

    #[tokio::test]
    async fn read_body_refuses_a_streamed_body_over_the_limit() {
        let body = boxed(chunks(["12345", "6789"]));

        let read = read_body(body, 8).await;

        assert!(matches!(read, Err(ReadError::TooLarge)));
    }

    #[tokio::test]
    async fn read_body_refuses_a_body_announced_over_the_limit_without_reading_it() {
        let body = Full::new(Bytes::from_static(b"123456789"))
            .map_err(|never: Infallible| match never {})
            .boxed_unsync();

        let read = read_body(body, 8).await;

        assert!(matches!(read, Err(ReadError::TooLarge)));
    }

    #[tokio::test]
    async fn read_body_reports_a_broken_body() {
        let body = boxed(Chunks(VecDeque::from([
            Ok(Bytes::from_static(b"{")),
            Err(BoxError::from("connection reset")),
        ])));

        let read = read_body(body, 64).await;

        assert!(matches!(read, Err(ReadError::Body(err)) if err.to_string() == "connection reset"));
    }
}
