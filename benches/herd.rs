//! A herd: 10,000 concurrent calls meet an expired token, and the token endpoint answers after
//! a fixed delay. Exactly one call reaches the token endpoint; every call's added latency is
//! about one refresh round trip. Criterion times the whole herd; the distribution of each
//! call's latency beyond the endpoint's delay is printed once, for the layer and for
//! `watch_floor`: the same herd hand-rolled with nothing but one `tokio::sync::watch` channel
//! that every caller waits on, the least any token layer can do. The difference between the
//! two is what the layer adds; the rest is the runtime waking and running 10,000 tasks.
#![allow(missing_docs)]

#[path = "support/mod.rs"]
mod support;

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use criterion::{criterion_group, criterion_main, Criterion};
use http::header::AUTHORIZATION;
use support::{bearer, ready_service, request, SECRET};
use tokio::sync::watch;
use tower::{Layer, ServiceExt};
use tower_token_refresh::{source, Error, RefreshLayer, Token};

const CALLERS: usize = 10_000;
const ENDPOINT_DELAY: Duration = Duration::from_millis(20);
/// Herds per contender behind the printed latency distribution.
const DISTRIBUTION_RUNS: usize = 5;

/// One herd: returns each call's latency and the number of token endpoint calls.
async fn herd() -> (Vec<Duration>, usize) {
    let endpoint_calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&endpoint_calls);
    let layer = RefreshLayer::new(source::from_fn(move |_previous| {
        counter.fetch_add(1, Ordering::SeqCst);
        async {
            tokio::time::sleep(ENDPOINT_DELAY).await;
            Ok::<_, Error>(Token::new(SECRET).with_expires_in(Duration::from_secs(3600)))
        }
    }));
    let service = layer.layer(ready_service());

    let calls: Vec<_> = (0..CALLERS)
        .map(|_| {
            let service = service.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                service.oneshot(request()).await.unwrap();
                started.elapsed()
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(CALLERS);
    for call in calls {
        latencies.push(call.await.unwrap());
    }
    (latencies, endpoint_calls.load(Ordering::SeqCst))
}

/// The same herd with the least a token layer can do: one task fetches, every caller waits on
/// one `watch` channel, then inserts the header and calls the service.
async fn watch_floor() -> Vec<Duration> {
    let (sender, receiver) = watch::channel(None);
    let fetch = tokio::spawn(async move {
        tokio::time::sleep(ENDPOINT_DELAY).await;
        sender.send_replace(Some(bearer()));
        // The sender lives until every caller is through; nobody is left waiting.
        sender.closed().await;
    });
    let service = ready_service();

    let calls: Vec<_> = (0..CALLERS)
        .map(|_| {
            let mut receiver = receiver.clone();
            let service = service.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let header = receiver.wait_for(Option::is_some).await.unwrap().clone();
                drop(receiver);
                let mut request = request();
                request.headers_mut().insert(AUTHORIZATION, header.unwrap());
                service.oneshot(request).await.unwrap();
                started.elapsed()
            })
        })
        .collect();
    drop(receiver);
    let mut latencies = Vec::with_capacity(CALLERS);
    for call in calls {
        latencies.push(call.await.unwrap());
    }
    fetch.await.unwrap();
    latencies
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

fn herd_bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    // NOTE: the distributions are printed from several herds each, run in turns, so that
    // one slow herd on a shared machine does not decide the figure.
    let mut refresh_layer = Vec::new();
    let mut floor = Vec::new();
    for _ in 0..DISTRIBUTION_RUNS {
        let (latencies, endpoint_calls) = runtime.block_on(herd());
        assert_eq!(
            endpoint_calls, 1,
            "one token endpoint call for the whole herd"
        );
        refresh_layer.extend(latencies);
        floor.extend(runtime.block_on(watch_floor()));
    }
    for (name, latencies) in [
        ("refresh_layer", &mut refresh_layer),
        ("watch_floor", &mut floor),
    ] {
        latencies.sort();
        let added = |p| percentile(latencies, p).saturating_sub(ENDPOINT_DELAY);
        println!(
            "herd/{name}: {CALLERS} callers x {DISTRIBUTION_RUNS} herds, token endpoint calls 1 per herd, \
             endpoint delay {ENDPOINT_DELAY:?}, added latency p50 {:?} p99 {:?} max {:?}",
            added(0.50),
            added(0.99),
            added(1.0)
        );
    }

    let mut group = c.benchmark_group("herd");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));
    group.bench_function("10000_callers_one_refresh", |b| {
        b.iter(|| {
            let (_, endpoint_calls) = runtime.block_on(herd());
            assert_eq!(endpoint_calls, 1);
        })
    });
    group.bench_function("watch_floor", |b| {
        b.iter(|| runtime.block_on(watch_floor()))
    });
    group.finish();
}

criterion_group!(benches, herd_bench);
criterion_main!(benches);
