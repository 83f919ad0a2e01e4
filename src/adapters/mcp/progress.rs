//! `chat.send` with a progress token (SPEC B14): the turn's tokens go out
//! as `notifications/progress` while it runs (`progress`: tokens so far,
//! `message`: the token), then the tool's result as without one.
//!
//! The tokens are read from the session's stream, through a hub
//! subscription taken after the session is opened and before the turn is
//! queued, and picked out by the turn's id: other turns on the session do
//! not leak into this call's progress. A subscription refused (the session
//! or the server has too many clients) only costs the progress.

use std::sync::Arc;
use std::time::Duration;

use rmcp::model::{ProgressNotificationParam, ProgressToken};
use rmcp::service::{Peer, RoleServer};
use serde_json::Value;

use crate::adapters::control::{Answer, ControlTools};
use crate::adapters::stream::SessionHub;

/// How long the stream is still read after the reply without the turn's
/// terminal event in view: a turn refused before it ran publishes nothing.
const AFTER_THE_END: Duration = Duration::from_millis(200);

/// `chat.send` with `args`, telling `peer` its progress under `token`.
pub async fn chat_send(
    control: &ControlTools,
    hub: &Arc<SessionHub>,
    args: Value,
    peer: &Peer<RoleServer>,
    token: ProgressToken,
) -> Answer {
    let (session, content) = control.chat_open(args).await?;
    let subscription = match hub.subscribe(&session, None).await {
        Ok(subscription) => Some(subscription),
        Err(error) => {
            tracing::info!(session.id = %session, %error, "chat.send runs without progress");
            None
        }
    };
    let turn = control.chat_submit(&session, content)?;
    let Some(mut subscription) = subscription else {
        return control.chat_reply(turn).await;
    };
    let turn_id = turn.turn_id().to_string();
    let mut reply = Box::pin(control.chat_reply(turn));
    let mut answer = None;
    let mut tokens: u32 = 0;
    loop {
        let frame = match answer {
            // Frames first: every token the turn streamed goes out before
            // its result.
            None => tokio::select! {
                biased;
                frame = subscription.next() => frame,
                ended = &mut reply => {
                    answer = Some(ended);
                    continue;
                }
            },
            Some(_) => tokio::time::timeout(AFTER_THE_END, subscription.next())
                .await
                .ok()
                .flatten(),
        };
        // Closed by the hub (this reader fell out of the window), or over.
        let Some(frame) = frame else { break };
        if !matches!(frame.op, "token" | "done" | "error" | "cancelled") {
            continue;
        }
        let Ok(frame_json) = serde_json::from_str::<Value>(&frame.json) else {
            continue;
        };
        if frame_json["turn_id"].as_str() != Some(turn_id.as_str()) {
            continue;
        }
        if frame.op != "token" {
            break;
        }
        tokens += 1;
        let text = frame_json["data"]["content"].as_str().unwrap_or_default();
        let mut progress = ProgressNotificationParam::new(token.clone(), f64::from(tokens));
        progress.message = Some(text.to_owned());
        if let Err(error) = peer.notify_progress(progress).await {
            tracing::debug!(%error, "progress not delivered; the call goes on");
        }
    }
    match answer {
        Some(answer) => answer,
        None => reply.await,
    }
}
