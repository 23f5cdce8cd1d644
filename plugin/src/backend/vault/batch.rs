//! Decrypt batching: decrypts of different ciphertexts that arrive while earlier decrypts are in
//! flight wait in a queue and go to Vault together as one transit `batch_input` call.
//!
//! Nothing waits for a batch to fill. A decrypt that finds a free call slot (of [`MAX_IN_FLIGHT`])
//! and nothing queued calls Vault itself, at once, with no task or channel in between: a lone
//! decrypt costs what it did without batching. Only decrypts that find every slot busy queue up;
//! the next slot to free up sends the whole queue as one call. In a storm (an apiserver filling its
//! cache, a KMS v1 cluster reading every Secret) that is most of them: 100 concurrent decrypts of
//! different ciphertexts took 2.1–2.5 ms here against ~19 ms as 100 separate calls
//! (fixtures/vault/README.md, "Measured"). Identical ciphertexts are merged before they get here.
//!
//! The queue is bounded ([`MAX_QUEUED`]): a decrypt that finds it full fails at once, retryable
//! (`overloaded`), instead of growing it. A queued decrypt whose caller gave up (the guard's timeout,
//! a cancelled gRPC call) is dropped before its batch is sent: Vault is not asked for a plaintext
//! no one will read, and a backlog of them does not push live decrypts past their deadline.
//!
//! A drain task serves other callers' decrypts, so it logs under their names, never its starter's: a
//! batch of one runs in its caller's span, a larger batch in a `vault_batch` span listing every
//! caller's uid.
//!
//! Each item keeps its own failure: a bad ciphertext in a batch fails only itself (Vault answers
//! 207 with per-item errors), and a batch Vault refuses whole with 400 (every item bad, or a server
//! without partial answers) is retried one item at a time, so every caller gets exactly the answer
//! a single call would have given. Failures of the call itself (network, sealed, denied) go to every
//! item, as they would have.

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use secrecy::{ExposeSecret, SecretSlice, SecretString};
use tokio::sync::oneshot;
use tracing::Instrument as _;

use super::api::{self, BatchItem};
use super::client::{BoxFut, Call, Op, clone_error, cut};
use super::{Inner, lock};
use crate::logging::Client;
use crate::{Error, Result};

/// Most items in one transit call: 4 JSON strings each stay well inside OpenBao's default
/// `max_request_json_strings` (1000), and the request body stays near 20 KiB.
const MAX_BATCH: usize = 100;
/// Transit decrypt calls running at once. More than one, so a slow answer does not hold back
/// every decrypt behind it.
const MAX_IN_FLIGHT: usize = 4;
/// Most decrypts waiting for a call slot: ten full batches, two and a half rounds of the
/// [`MAX_IN_FLIGHT`] slots. A healthy Vault clears that in a few batch round trips (2–3 ms each
/// here); a queue longer than that only forms when Vault is too slow to clear it within the
/// callers' deadlines, so more would just time out later, holding memory meanwhile. A decrypt
/// beyond it fails at once with a retryable error (gRPC UNAVAILABLE) and the apiserver retries.
pub const MAX_QUEUED: usize = 10 * MAX_BATCH;

/// Decrypts waiting for a call, and how many calls are running.
#[derive(Default)]
pub(super) struct Queue {
    waiting: Vec<Waiting>,
    in_flight: usize,
}

struct Waiting {
    item: BatchItem,
    reply: oneshot::Sender<Result<Arc<SecretSlice<u8>>>>,
    caller: Caller,
}

/// Whose decrypt an item is, for the drain task's log lines.
pub(super) struct Caller {
    /// The caller's uid, escaped and cut (see [`Client`]).
    uid: String,
    /// The caller's span (its `rpc` or `health_probe` span).
    span: tracing::Span,
}

impl Caller {
    /// The caller running now, with request uid `uid`.
    pub(super) fn current(uid: &str) -> Self {
        Self {
            uid: Client(uid).to_string(),
            span: tracing::Span::current(),
        }
    }
}

impl Waiting {
    /// Whether the caller stopped waiting (its future was dropped: timed out or cancelled).
    fn abandoned(&self) -> bool {
        self.reply.is_closed()
    }
}

/// What a decrypt arriving at the queue does.
enum Admission {
    /// A call slot was free and nothing waits: call Vault directly (the slot is taken).
    Direct(BatchItem),
    /// Queued; `start_drain` if a slot was free (and taken) for a drain task.
    Queued { start_drain: bool },
    /// The queue is full of decrypts whose callers still wait: refused.
    Full,
}

impl Queue {
    fn admit(
        &mut self,
        item: BatchItem,
        caller: Caller,
        reply: oneshot::Sender<Result<Arc<SecretSlice<u8>>>>,
    ) -> Admission {
        let free = self.in_flight < MAX_IN_FLIGHT;
        if free && self.waiting.is_empty() {
            self.in_flight += 1;
            return Admission::Direct(item);
        }
        if self.waiting.len() >= MAX_QUEUED {
            // Abandoned decrypts hold no place: only live ones count against the bound.
            self.waiting.retain(|w| !w.abandoned());
            if self.waiting.len() >= MAX_QUEUED {
                return Admission::Full;
            }
        }
        self.waiting.push(Waiting { item, reply, caller });
        if free {
            self.in_flight += 1;
        }
        Admission::Queued { start_drain: free }
    }

    /// The next batch (at most [`MAX_BATCH`]) of decrypts whose callers still wait, abandoned ones
    /// dropped unsent; `None` once nothing is left, with the drain's call slot given back under the
    /// same lock that saw the queue empty (a decrypt queued after that finds the slot free).
    fn next_batch(&mut self) -> Option<Vec<Waiting>> {
        let before = self.waiting.len();
        self.waiting.retain(|w| !w.abandoned());
        let dropped = before - self.waiting.len();
        if dropped > 0 {
            tracing::debug!(dropped, "vault: not sending decrypts whose callers gave up");
        }
        if self.waiting.is_empty() {
            self.in_flight = self.in_flight.saturating_sub(1);
            return None;
        }
        let take = self.waiting.len().min(MAX_BATCH);
        Some(self.waiting.drain(..take).collect())
    }
}

impl Inner {
    /// Decrypts one ciphertext: at once if a call slot is free and nothing is queued, else in a
    /// batch with whatever else is waiting.
    pub(super) async fn decrypt_batched(
        self: &Arc<Self>,
        item: BatchItem,
        caller: Caller,
    ) -> Result<Arc<SecretSlice<u8>>> {
        let (reply, answer) = oneshot::channel();
        let admission = lock(&self.queue).admit(item, caller, reply);
        let start_drain = match admission {
            Admission::Direct(item) => {
                // No task, no channel. Decrypts that queue meanwhile are drained when the slot is
                // given back, even if this caller is cancelled.
                let _slot = Slot::taken(self.clone());
                return self.decrypt_one(&item).await;
            }
            Admission::Queued { start_drain } => start_drain,
            Admission::Full => {
                return Err(Error::Unavailable {
                    backend: "vault",
                    class: "overloaded",
                    detail: format!(
                        "{MAX_QUEUED} decrypts already wait for Vault; retry (Vault answers slower than they arrive)"
                    ),
                });
            }
        };
        if start_drain {
            // A task of its own: callers may be cancelled (the guard's timeout), the queue may not.
            let inner = self.clone();
            tokio::spawn(async move { inner.drain().await });
        }
        answer
            .await
            .unwrap_or_else(|_| Err(Error::Backend("a batched decrypt was dropped unanswered".into())))
    }

    /// Sends what is queued, batch after batch, until the queue is empty.
    async fn drain(self: Arc<Self>) {
        let mut slot = Slot::taken(self.clone());
        loop {
            let next = lock(&self.queue).next_batch();
            let Some(batch) = next else {
                slot.returned = true;
                return;
            };
            self.answer(batch).await;
        }
    }

    async fn answer(&self, batch: Vec<Waiting>) {
        if let [_] = batch.as_slice() {
            for waiting in batch {
                let span = waiting.caller.span.clone();
                let result = self.decrypt_one(&waiting.item).instrument(span).await;
                let _ = waiting.reply.send(result);
            }
            return;
        }
        let uids: Vec<&str> = batch.iter().map(|w| w.caller.uid.as_str()).collect();
        let span =
            tracing::error_span!(parent: None, "vault_batch", size = batch.len(), uids = %uids.join(","));
        let items: Vec<BatchItem> = batch.iter().map(|w| w.item.clone()).collect();
        match self.decrypt_many(items).instrument(span).await {
            Ok(results) if results.len() == batch.len() => {
                for (waiting, result) in batch.into_iter().zip(results) {
                    let _ = waiting.reply.send(plaintext_of(result));
                }
            }
            Ok(results) => {
                let (answered, asked) = (results.len(), batch.len());
                for waiting in batch {
                    let _ = waiting.reply.send(Err(Error::Backend(format!(
                        "batch decrypt answered {answered} results for {asked} ciphertexts"
                    ))));
                }
            }
            // Every item failed, or the server predates partial answers: ask for each alone (those
            // whose callers still wait).
            Err(Error::BadCiphertext(_)) => {
                for waiting in batch.into_iter().filter(|w| !w.abandoned()) {
                    let span = waiting.caller.span.clone();
                    let result = self.decrypt_one(&waiting.item).instrument(span).await;
                    let _ = waiting.reply.send(result);
                }
            }
            Err(err) => {
                for waiting in batch {
                    let _ = waiting.reply.send(Err(clone_error(&err)));
                }
            }
        }
    }

    async fn decrypt_one(&self, item: &BatchItem) -> Result<Arc<SecretSlice<u8>>> {
        let (mount, name, item) = (self.mount.clone(), self.key.clone(), item.clone());
        let f = move |call: Call| -> BoxFut<api::Plaintext> {
            let endpoint = api::Decrypt {
                mount: mount.clone(),
                name: name.clone(),
                ciphertext: item.ciphertext.clone(),
                associated_data: item.associated_data.clone(),
            };
            Box::pin(async move { vaultrs::api::exec_with_result(&call, endpoint).await })
        };
        let answer = self.run(Op::Decrypt, &f).await?;
        decode(&answer.plaintext)
    }

    async fn decrypt_many(&self, items: Vec<BatchItem>) -> Result<Vec<api::BatchResult>> {
        let (mount, name) = (self.mount.clone(), self.key.clone());
        let f = move |call: Call| -> BoxFut<api::BatchPlaintexts> {
            let endpoint = api::BatchDecrypt {
                mount: mount.clone(),
                name: name.clone(),
                batch_input: items.clone(),
                partial_failure_response_code: 207,
            };
            Box::pin(async move { vaultrs::api::exec_with_result(&call, endpoint).await })
        };
        Ok(self.run(Op::Decrypt, &f).await?.batch_results)
    }
}

/// One batch item's answer, classified as a single decrypt's would be.
pub(crate) fn plaintext_of(result: api::BatchResult) -> Result<Arc<SecretSlice<u8>>> {
    match result.plaintext {
        Some(plaintext) if result.error.is_empty() => decode(&plaintext),
        _ if result.error.to_ascii_lowercase().contains("key not found") => Err(Error::Unavailable {
            backend: "vault",
            class: "key_missing",
            detail: cut(&result.error),
        }),
        _ => Err(Error::BadCiphertext(format!(
            "transit refused this ciphertext: {}",
            cut(&result.error)
        ))),
    }
}

fn decode(plaintext: &SecretString) -> Result<Arc<SecretSlice<u8>>> {
    let plain = B64
        .decode(plaintext.expose_secret())
        .map_err(|_| Error::Backend("decrypt answered plaintext that is not base64".into()))?;
    Ok(Arc::new(SecretSlice::from(plain)))
}

/// One of the [`MAX_IN_FLIGHT`] call slots, held by a direct decrypt or a drain task. Dropped
/// without being returned (a direct decrypt done or cancelled, a drain task that panicked), it
/// passes itself to a new drain task if decrypts are waiting, so nothing queued is left behind.
struct Slot {
    inner: Arc<Inner>,
    returned: bool,
}

impl Slot {
    /// A slot already counted in `in_flight`.
    fn taken(inner: Arc<Inner>) -> Self {
        Self {
            inner,
            returned: false,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.returned {
            return;
        }
        let mut queue = lock(&self.inner.queue);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) if !queue.waiting.is_empty() => {
                drop(queue);
                let inner = self.inner.clone();
                runtime.spawn(async move { inner.drain().await });
            }
            _ => queue.in_flight = queue.in_flight.saturating_sub(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Answer = oneshot::Receiver<Result<Arc<SecretSlice<u8>>>>;

    fn item(i: usize) -> BatchItem {
        BatchItem {
            ciphertext: format!("vault:v1:{i}"),
            associated_data: String::new(),
        }
    }

    fn admit(queue: &mut Queue, i: usize) -> (Admission, Answer) {
        let (reply, answer) = oneshot::channel();
        (queue.admit(item(i), Caller::current("u"), reply), answer)
    }

    fn ciphertexts(batch: &[Waiting]) -> Vec<String> {
        batch.iter().map(|w| w.item.ciphertext.clone()).collect()
    }

    #[test]
    fn a_full_queue_refuses_a_decrypt_instead_of_growing() {
        let mut queue = Queue::default();
        let mut answers = Vec::new();
        for i in 0..MAX_IN_FLIGHT {
            let (admission, answer) = admit(&mut queue, i);
            assert!(matches!(admission, Admission::Direct(_)), "slot {i}");
            answers.push(answer);
        }
        for i in 0..MAX_QUEUED {
            let (admission, answer) = admit(&mut queue, i);
            assert!(
                matches!(admission, Admission::Queued { start_drain: false }),
                "item {i}"
            );
            answers.push(answer);
        }
        let (admission, _answer) = admit(&mut queue, MAX_QUEUED);
        assert!(matches!(admission, Admission::Full));
        assert_eq!(
            queue.waiting.len(),
            MAX_QUEUED,
            "the refused decrypt was not queued"
        );
        // A caller that gives up frees its place.
        drop(answers.pop());
        let (admission, _answer) = admit(&mut queue, MAX_QUEUED + 1);
        assert!(matches!(admission, Admission::Queued { .. }));
        assert_eq!(queue.waiting.len(), MAX_QUEUED);
    }

    #[test]
    fn decrypts_whose_callers_gave_up_are_not_sent() {
        let mut queue = Queue {
            in_flight: MAX_IN_FLIGHT,
            ..Queue::default()
        };
        let mut waiting = Vec::new();
        for i in 0..10 {
            let (admission, answer) = admit(&mut queue, i);
            assert!(matches!(admission, Admission::Queued { start_drain: false }));
            // Callers of every item but 0, 3, 6, 9 give up (their answer is dropped).
            if i % 3 == 0 {
                waiting.push(answer);
            }
        }
        let batch = queue.next_batch().expect("live decrypts wait");
        assert_eq!(
            ciphertexts(&batch),
            ["vault:v1:0", "vault:v1:3", "vault:v1:6", "vault:v1:9"]
        );
        // Every caller gives up: nothing is sent and the drain's slot is given back.
        let (_, gone) = admit(&mut queue, 10);
        drop(gone);
        assert!(queue.next_batch().is_none());
        assert_eq!(queue.in_flight, MAX_IN_FLIGHT - 1);
        drop(waiting);
    }
}
