//! End to end: hyper-util's client against a hyper server on loopback, with and without the
//! layer (retries on and off), and with a fixed bearer header (`static_header`: what carrying
//! the token costs the client and the server, whatever puts it there), 64 calls in flight.
//! Reported as requests per second.
#![allow(missing_docs)]

#[path = "support/mod.rs"]
mod support;

use std::{
    convert::Infallible,
    net::SocketAddr,
    time::{Duration, Instant},
};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use support::Body;
use tower::{Layer, Service, ServiceExt};

const IN_FLIGHT: u64 = 64;

/// A hyper server on 127.0.0.1 that answers every request with a short body.
async fn server() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let answer = service_fn(|_request: Request<Incoming>| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), answer)
                    .await;
            });
        }
    });
    addr
}

fn bench<S, B>(
    group: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>,
    runtime: &tokio::runtime::Runtime,
    name: &str,
    url: &str,
    service: S,
) where
    S: Service<Request<Body>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: std::fmt::Debug,
{
    group.bench_function(name, |b| {
        b.iter_custom(|iterations| {
            let per_task = iterations.div_ceil(IN_FLIGHT);
            runtime.block_on(async {
                let started = Instant::now();
                let tasks: Vec<_> = (0..IN_FLIGHT)
                    .map(|_| {
                        let service = service.clone();
                        let url = url.to_owned();
                        tokio::spawn(async move {
                            for _ in 0..per_task {
                                let request = Request::get(&url).body(Body::default()).unwrap();
                                let response = service.clone().oneshot(request).await.unwrap();
                                response.into_body().collect().await.unwrap();
                            }
                        })
                    })
                    .collect();
                for task in tasks {
                    task.await.unwrap();
                }
                started
                    .elapsed()
                    .mul_f64(iterations as f64 / (per_task * IN_FLIGHT) as f64)
            })
        })
    });
}

fn end_to_end(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let addr = runtime.block_on(server());
    let url = format!("http://{addr}/v1/orders");
    let layer = runtime.block_on(support::refresh_layer());
    let client = {
        let _entered = runtime.enter();
        Client::builder(TokioExecutor::new()).build_http::<Body>()
    };

    let mut group = c.benchmark_group("end_to_end");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(5));
    bench(&mut group, &runtime, "hyper_client", &url, client.clone());
    // The same bearer header from a fixed value: what sending the token costs, layer aside.
    bench(
        &mut group,
        &runtime,
        "hyper_client_static_header",
        &url,
        support::static_header(client.clone()),
    );
    bench(
        &mut group,
        &runtime,
        "hyper_client_refresh_layer",
        &url,
        layer.layer(client.clone()),
    );
    bench(
        &mut group,
        &runtime,
        "hyper_client_refresh_layer_no_retry",
        &url,
        layer.retry(false).layer(client),
    );
    group.finish();
}

criterion_group!(benches, end_to_end);
criterion_main!(benches);
