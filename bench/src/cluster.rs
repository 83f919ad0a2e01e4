//! Two instances on one PostgreSQL (issue 12): chat turns/s of the pair
//! against one instance on the same database, the notifications that
//! carried them, and a token's arrival on clients of the other instance
//! against clients of the instance that runs the turn.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::load::{self, Window};
use crate::report::{Met, Outcome, Row, millis, per_second};
use crate::server::{self, Process};
use crate::{Plan, fanout, phases, postgres};

/// Fan-out across instances: a token's p99 at most this much above the
/// same-instance figure.
const CROSS_FANOUT_EXTRA_MS: f64 = 50.0;

/// A server on the schema `url`, with `extra` flags.
async fn instance(
    plan: &Plan,
    url: &str,
    extra: &[String],
    files: &[(&str, String)],
) -> anyhow::Result<Process> {
    let mut args = vec!["--database-url".to_owned(), url.to_owned()];
    args.extend_from_slice(extra);
    server::start_server(plan, &args, files).await
}

/// The value of the metric line that starts with `name` (labels
/// included), 0 when absent.
async fn metric(process: &Process, name: &str) -> anyhow::Result<f64> {
    let text = reqwest::Client::builder()
        .no_proxy()
        .build()?
        .get(format!("http://{}/metrics", process.address))
        .send()
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .filter(|line| line.starts_with(name))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

const SENT: &str = "autopoiesis_cluster_notifications_sent_total{channel=\"events\"}";
const STORED: &str = "autopoiesis_stream_events_stored_total";

pub async fn cluster(plan: &Plan, outcome: &mut Outcome) -> anyhow::Result<()> {
    let Some(url) = plan.postgres_url.as_deref() else {
        for figure in [
            "chat turns/s, 2 instances on one PostgreSQL vs 1",
            "fan-out across instances",
        ] {
            outcome.rows.push(Row {
                figure: figure.into(),
                value: "not measured (no PostgreSQL URL)".into(),
                p50: "—".into(),
                p99: "—".into(),
                target: "—".into(),
                met: Met::NotAvailable,
            });
        }
        return Ok(());
    };
    chat_pair(plan, url, outcome).await?;
    fanout_pair(plan, url, outcome).await
}

async fn chat_pair(plan: &Plan, url: &str, outcome: &mut Outcome) -> anyhow::Result<()> {
    let schema = postgres::Schema::create(url)?;
    let a = instance(plan, &schema.url, &[], &[]).await?;
    let b = instance(plan, &schema.url, &[], &[]).await?;
    let turns = plan.chat_turns_per_session;
    let half = Window {
        connections: (plan.connections / 2).max(1),
        warmup: plan.warmup,
        duration: plan.duration,
    };
    let full = Window {
        connections: plan.connections,
        warmup: plan.warmup,
        duration: plan.duration,
    };
    let (mut ones, mut twos, mut ratios, mut notes) = (vec![], vec![], vec![], vec![]);
    let (mut notify_rates, mut per_notification) = (vec![], vec![]);
    let mut cores = (vec![], vec![]);
    for round in 0..plan.rounds {
        let started = Instant::now();
        let cpu = a.cpu_seconds()?;
        let one = load::run(
            a.address,
            Arc::new(phases::chat_workload(a.address, 1000 + round * 2, turns)),
            full,
        )
        .await?;
        cores
            .0
            .push((a.cpu_seconds()? - cpu) / started.elapsed().as_secs_f64());
        let (sent, stored) = (
            metric(&a, SENT).await? + metric(&b, SENT).await?,
            metric(&a, STORED).await? + metric(&b, STORED).await?,
        );
        let started = Instant::now();
        let cpu = a.cpu_seconds()? + b.cpu_seconds()?;
        let (on_a, on_b) = tokio::join!(
            load::run(
                a.address,
                Arc::new(phases::chat_workload(a.address, 1001 + round * 2, turns)),
                half,
            ),
            load::run(
                b.address,
                Arc::new(phases::chat_workload(b.address, 2001 + round * 2, turns)),
                half,
            ),
        );
        let wall = started.elapsed().as_secs_f64();
        cores
            .1
            .push((a.cpu_seconds()? + b.cpu_seconds()? - cpu) / wall);
        let (on_a, on_b) = (on_a?, on_b?);
        let sent = metric(&a, SENT).await? + metric(&b, SENT).await? - sent;
        let stored = metric(&a, STORED).await? + metric(&b, STORED).await? - stored;
        let pair = on_a.rate + on_b.rate;
        ratios.push(pair / one.rate.max(1.0));
        notify_rates.push(sent / wall);
        per_notification.push(stored / sent.max(1.0));
        notes.push(format!(
            "round {}: one instance {:.0} turns/s, two {:.0} turns/s ({:.0} + {:.0}); {:.0} notifications/s carrying {:.1} events each",
            round + 1,
            one.rate,
            pair,
            on_a.rate,
            on_b.rate,
            sent / wall,
            stored / sent.max(1.0)
        ));
        eprintln!("{}", notes.last().unwrap());
        ones.push(one.rate);
        twos.push(pair);
    }
    let ratio = phases::median(&mut ratios);
    let one = phases::median(&mut ones);
    let two = phases::median(&mut twos);
    outcome.rows.push(Row {
        figure: format!(
            "chat turns/s (echo), 2 instances on one PostgreSQL ({} sessions each) vs 1 instance ({} sessions), same database",
            half.connections, full.connections
        ),
        value: format!(
            "{} turns/s vs {} turns/s = {ratio:.2} ×",
            per_second(two),
            per_second(one)
        ),
        p50: "—".into(),
        p99: "—".into(),
        target: "report the ratio (2 cores cannot double)".into(),
        met: Met::Info,
    });
    let rate = phases::median(&mut notify_rates);
    let each = phases::median(&mut per_notification);
    outcome.rows.push(Row {
        figure: "event notifications at that chat throughput (2 instances)".into(),
        value: format!(
            "{} notifications/s for {} turns/s: {each:.1} events per notification",
            per_second(rate),
            per_second(two)
        ),
        p50: "—".into(),
        p99: "—".into(),
        target: "coalesced (fewer notifications than events)".into(),
        met: if each > 1.0 { Met::Yes } else { Met::No },
    });
    outcome.notes.push(format!(
        "chat across instances: the server used {:.2} cores alone and the pair {:.2} cores together (the bench and PostgreSQL share the same 2 cores); {}",
        phases::median(&mut cores.0),
        phases::median(&mut cores.1),
        notes.join("; ")
    ));
    drop((a, b));
    drop(schema);
    Ok(())
}

async fn fanout_pair(plan: &Plan, url: &str, outcome: &mut Outcome) -> anyhow::Result<()> {
    let schema = postgres::Schema::create(url)?;
    let clients = plan.fanout_clients;
    let (flags, files) = phases::fanout_server(plan);
    let a = instance(plan, &schema.url, &flags, &files).await?;
    let b = instance(plan, &schema.url, &flags, &files).await?;
    let prompt: Vec<String> = (0..plan.fanout_words).map(|i| format!("w{i}")).collect();
    let within = Duration::from_millis(
        plan.fanout_token_ms * plan.fanout_words as u64 * plan.fanout_turns as u64 * 2,
    ) + Duration::from_secs(60);

    // The same instance: every client on A, the turn on A.
    let same = "bench-fanout-same";
    let sockets = fanout::connect_many(a.address, clients + 1, |_| same.to_owned()).await?;
    let local = fanout::measure(
        a.address,
        same,
        sockets,
        &prompt.join(" "),
        plan.fanout_turns,
        within,
    )
    .await?;
    // Across: one client on A (the token's first arrival), the rest on B.
    let cross = "bench-fanout-cross";
    let mut sockets = fanout::connect_many(a.address, 1, |_| cross.to_owned()).await?;
    sockets.extend(fanout::connect_many(b.address, clients, |_| cross.to_owned()).await?);
    let remote = fanout::measure(
        a.address,
        cross,
        sockets,
        &prompt.join(" "),
        plan.fanout_turns,
        within,
    )
    .await?;
    let (local_p99, remote_p99) = (
        local.first_to_last.value_at_quantile(0.99),
        remote.first_to_last.value_at_quantile(0.99),
    );
    let extra_ms = (remote_p99 as f64 - local_p99 as f64) / 1000.0;
    let complete = local.incomplete_clients == 0 && remote.incomplete_clients == 0;
    outcome.rows.push(Row {
        figure: format!(
            "fan-out across instances: turn on A, {clients} WebSocket clients on B; a token's arrival on A's client → B's last client"
        ),
        value: format!(
            "{} tokens; same instance ({} clients on A) p99 {}, across {}: {extra_ms:+.1} ms{}",
            remote.tokens,
            clients + 1,
            millis(local_p99),
            millis(remote_p99),
            if complete { "" } else { "; some clients missed tokens" }
        ),
        p50: millis(remote.first_to_last.value_at_quantile(0.5)),
        p99: millis(remote_p99),
        target: format!("p99 ≤ same-instance + {CROSS_FANOUT_EXTRA_MS} ms"),
        met: if complete && extra_ms <= CROSS_FANOUT_EXTRA_MS {
            Met::Yes
        } else {
            Met::No
        },
    });
    drop((a, b));
    drop(schema);
    Ok(())
}
