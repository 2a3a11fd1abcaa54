#![allow(missing_docs)]
//! The cost the layer adds to one request on the fresh-token path, next to the bare inner
//! service and a static header, measured in the same run.
//!
//! Each iteration drives one request through `poll_ready`, `call` and one poll of the response
//! future, with a no-op waker: the inner service answers at once, so what remains is the work
//! of the middleware itself. Building the request is left out of the measurement.

use std::{
    convert::Infallible,
    future::Future,
    pin::pin,
    task::{Context, Poll, Waker},
    time::Duration,
};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use http::{header::AUTHORIZATION, HeaderValue, Request, Response};
use http_body_util::Full;
use tower::{Layer, Service};
use tower_http::set_header::SetRequestHeaderLayer;
use tower_token_refresh::{source, Error, RefreshLayer, Token};

type Body = Full<Bytes>;

/// A ready service that answers 200 at once.
fn inner() -> impl Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Clone {
    tower::service_fn(|_request: Request<Body>| {
        std::future::ready(Ok::<_, Infallible>(Response::new(Body::default())))
    })
}

/// One request through `service`, start to finish, without a runtime.
fn drive<S, B>(service: &mut S, request: Request<Body>) -> Response<B>
where
    S: Service<Request<Body>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    match service.poll_ready(&mut cx) {
        Poll::Ready(Ok(())) => {}
        _ => panic!("inner service not ready"),
    }
    let future = pin!(service.call(request));
    match future.poll(&mut cx) {
        Poll::Ready(Ok(response)) => response,
        _ => panic!("response not ready at once"),
    }
}

fn request() -> Request<Body> {
    Request::get("http://api.example.test/v1/orders")
        .body(Body::default())
        .unwrap()
}

fn overhead(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let secret =
        "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJiZW5jaCJ9.c2lnbmF0dXJlLW9mLWEtcmVhbGlzdGljLWxlbmd0aA";

    let mut bare = inner();
    let mut static_header = SetRequestHeaderLayer::overriding(
        AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {secret}")).unwrap(),
    )
    .layer(inner());
    let layer = RefreshLayer::new(source::from_fn(move |_previous| async move {
        Ok::<_, Error>(Token::new(secret).with_expires_in(Duration::from_secs(3600)))
    }));
    runtime.block_on(layer.handle().refresh()).unwrap();
    let mut refresh_layer = layer.layer(inner());
    let mut refresh_layer_no_retry = layer.clone().retry(false).layer(inner());

    let mut group = c.benchmark_group("overhead");
    group.bench_function("bare", |b| {
        b.iter_batched(request, |r| drive(&mut bare, r), BatchSize::SmallInput)
    });
    group.bench_function("static_header", |b| {
        b.iter_batched(
            request,
            |r| drive(&mut static_header, r),
            BatchSize::SmallInput,
        )
    });
    group.bench_function("refresh_layer", |b| {
        let _entered = runtime.enter();
        b.iter_batched(
            request,
            |r| drive(&mut refresh_layer, r),
            BatchSize::SmallInput,
        )
    });
    group.bench_function("refresh_layer_no_retry", |b| {
        let _entered = runtime.enter();
        b.iter_batched(
            request,
            |r| drive(&mut refresh_layer_no_retry, r),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, overhead);
criterion_main!(benches);
