//! The cost the layer adds to one request on the fresh-token path, next to the bare inner
//! service and the alternatives a user would write instead, measured in the same run.
//!
//! Each iteration drives one request through `poll_ready`, `call` and the response future, with
//! a no-op waker, on one thread: the inner service answers at once, so what remains is the
//! work of the middleware itself. Building the request is left out of the measurement.
#![allow(missing_docs)]

#[path = "support/mod.rs"]
mod support;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use http::{Request, Response};
use support::{drive, ready_service, request, Body};
use tower::{Layer, Service};

fn bench<S, B>(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    mut service: S,
) where
    S: Service<Request<Body>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
{
    group.bench_function(name, |b| {
        b.iter_batched(request, |r| drive(&mut service, r), BatchSize::SmallInput)
    });
}

fn overhead(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _entered = runtime.enter();
    let layer = runtime.block_on(support::refresh_layer());

    let mut group = c.benchmark_group("overhead");
    bench(&mut group, "bare", ready_service());
    bench(
        &mut group,
        "static_header",
        support::static_header(ready_service()),
    );
    bench(&mut group, "arc_floor", support::arc_floor(ready_service()));
    bench(
        &mut group,
        "mutex_layer",
        support::mutex_layer(ready_service()),
    );
    bench(
        &mut group,
        "lockfree_floor",
        support::lockfree_floor(ready_service(), false),
    );
    bench(
        &mut group,
        "lockfree_floor_copy",
        support::lockfree_floor(ready_service(), true),
    );
    bench(
        &mut group,
        "refresh_layer",
        layer.clone().layer(ready_service()),
    );
    bench(
        &mut group,
        "refresh_layer_no_retry",
        layer.retry(false).layer(ready_service()),
    );
    group.finish();
}

criterion_group!(benches, overhead);
criterion_main!(benches);
