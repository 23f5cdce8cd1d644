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

use super::api::{self, BatchItem};
use super::client::{BoxFut, Call, Op, clone_error, cut};
use super::{Inner, lock};
use crate::{Error, Result};

/// Most items in one transit call: 4 JSON strings each stay well inside OpenBao's default
/// `max_request_json_strings` (1000), and the request body stays near 20 KiB.
const MAX_BATCH: usize = 100;
/// Transit decrypt calls running at once. More than one, so a slow answer does not hold back
/// every decrypt behind it.
const MAX_IN_FLIGHT: usize = 4;

/// Decrypts waiting for a call, and how many calls are running.
#[derive(Default)]
pub(super) struct Queue {
    waiting: Vec<Waiting>,
    in_flight: usize,
}

struct Waiting {
    item: BatchItem,
    reply: oneshot::Sender<Result<Arc<SecretSlice<u8>>>>,
}

impl Inner {
    /// Decrypts one ciphertext: at once if a call slot is free and nothing is queued, else in a
    /// batch with whatever else is waiting.
    pub(super) async fn decrypt_batched(self: &Arc<Self>, item: BatchItem) -> Result<Arc<SecretSlice<u8>>> {
        let (reply, answer) = oneshot::channel();
        let (direct, start_drain) = {
            let mut queue = lock(&self.queue);
            let free = queue.in_flight < MAX_IN_FLIGHT;
            if free {
                queue.in_flight += 1;
            }
            if free && queue.waiting.is_empty() {
                (Some(item), false)
            } else {
                queue.waiting.push(Waiting { item, reply });
                (None, free)
            }
        };
        if let Some(item) = direct {
            // No task, no channel. Decrypts that queue meanwhile are drained when the slot is given
            // back, even if this caller is cancelled.
            let _slot = Slot::taken(self.clone());
            return self.decrypt_one(&item).await;
        }
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
            let batch: Vec<Waiting> = {
                let mut queue = lock(&self.queue);
                if queue.waiting.is_empty() {
                    // Given back under the same lock that saw the queue empty: a decrypt queued
                    // after this point finds the slot free and calls Vault itself.
                    queue.in_flight = queue.in_flight.saturating_sub(1);
                    slot.returned = true;
                    return;
                }
                let take = queue.waiting.len().min(MAX_BATCH);
                queue.waiting.drain(..take).collect()
            };
            self.answer(batch).await;
        }
    }

    async fn answer(&self, batch: Vec<Waiting>) {
        if let [_] = batch.as_slice() {
            for waiting in batch {
                let result = self.decrypt_one(&waiting.item).await;
                let _ = waiting.reply.send(result);
            }
            return;
        }
        let items: Vec<BatchItem> = batch.iter().map(|w| w.item.clone()).collect();
        match self.decrypt_many(items).await {
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
            // Every item failed, or the server predates partial answers: ask for each alone.
            Err(Error::BadCiphertext(_)) => {
                for waiting in batch {
                    let result = self.decrypt_one(&waiting.item).await;
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
fn plaintext_of(result: api::BatchResult) -> Result<Arc<SecretSlice<u8>>> {
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
