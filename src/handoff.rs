//! Answers from a thread outside the runtimes (the store's writer) to tasks on the proxy's
//! current-thread runtimes, with one wake-up per runtime per batch instead of one per answer.
//!
//! A `oneshot` answered from another thread wakes its task's runtime on the spot: for a
//! current-thread runtime that is a write(2) to its eventfd for every answer, whether the
//! runtime was asleep or not. The writer answers a whole commit group at once (tens of
//! acknowledged writes at 64 concurrent writers, measured: one eventfd write per acknowledged
//! write), so here the answers of a group are gathered per runtime and each runtime is woken
//! once; a task of its own ([`serve_here`]) hands them out there, where waking the waiting
//! tasks is a push to the local run queue.
//!
//! - [`channel`] makes the pair; its [`Sender`] remembers the proxy runtime it was made on, if
//!   any (a thread that called [`serve_here`]).
//! - [`Sender::send`] answers at once, like a `oneshot`, unless the sending thread has a
//!   [`Batch`] open: then the answer waits in its runtime's mailbox until the batch is dropped,
//!   which wakes each runtime that got answers once.
//! - Answers for a runtime that has no mailbox (the main runtime, tests), or whose mailbox
//!   closed when its runtime stopped, are sent directly.

use std::cell::RefCell;
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, oneshot};

/// An answer waiting in a mailbox: sends it on its `oneshot` when run.
type Delivery = Box<dyn FnOnce() + Send>;

/// The answers waiting for one runtime, and the wake-up of the task that hands them out.
struct Mailbox {
    /// `None` once the runtime's [`Home`] is dropped: answers then go directly.
    waiting: Mutex<Option<Vec<Delivery>>>,
    notify: Notify,
}

impl Mailbox {
    /// Leave `delivery` for the runtime; `Err` gives it back when the mailbox is closed.
    fn post(&self, delivery: Delivery) -> Result<(), Delivery> {
        match self.waiting.lock() {
            Ok(mut waiting) => match waiting.as_mut() {
                Some(list) => {
                    list.push(delivery);
                    Ok(())
                }
                None => Err(delivery),
            },
            Err(_) => Err(delivery),
        }
    }

    /// Everything waiting, leaving the mailbox open (`close`: closed).
    fn take(&self, close: bool) -> Vec<Delivery> {
        match self.waiting.lock() {
            Ok(mut waiting) if close => waiting.take().unwrap_or_default(),
            Ok(mut waiting) => waiting.as_mut().map(std::mem::take).unwrap_or_default(),
            Err(_) => Vec::new(),
        }
    }
}

thread_local! {
    /// This thread's runtime's mailbox (proxy threads, see [`serve_here`]).
    static HOME: RefCell<Option<Arc<Mailbox>>> = const { RefCell::new(None) };
    /// The mailboxes that got answers in this thread's open [`Batch`] (`None`: no batch).
    static BATCH: RefCell<Option<Vec<Arc<Mailbox>>>> = const { RefCell::new(None) };
}

/// The sending half: answers once, from any thread.
pub struct Sender<T> {
    tx: oneshot::Sender<T>,
    home: Option<Arc<Mailbox>>,
}

/// A sender and its receiver; the sender remembers the calling thread's runtime mailbox.
pub fn channel<T>() -> (Sender<T>, oneshot::Receiver<T>) {
    let (tx, rx) = oneshot::channel();
    let home = HOME.with(|h| h.borrow().clone());
    (Sender { tx, home }, rx)
}

impl<T: Send + 'static> Sender<T> {
    /// Answer: at once, or when this thread's open [`Batch`] ends. A receiver that is gone
    /// is not an error (its caller stopped waiting).
    pub fn send(self, value: T) {
        let Sender { tx, home } = self;
        let deliver = move || {
            let _ = tx.send(value);
        };
        let Some(home) = home else {
            return deliver();
        };
        if BATCH.with(|batch| batch.borrow().is_none()) {
            return deliver();
        }
        match home.post(Box::new(deliver)) {
            Ok(()) => BATCH.with(|batch| {
                if let Some(touched) = batch.borrow_mut().as_mut()
                    && !touched.iter().any(|m| Arc::ptr_eq(m, &home))
                {
                    touched.push(home);
                }
            }),
            Err(delivery) => delivery(),
        }
    }
}

/// Answers sent on this thread while it is alive wait in their runtimes' mailboxes; dropping
/// it wakes each runtime that got any, once. Batches do not nest: an inner one is a no-op.
pub struct Batch {
    outer: bool,
}

impl Batch {
    /// Open a batch on this thread.
    pub fn begin() -> Batch {
        let outer = BATCH.with(|b| {
            let mut b = b.borrow_mut();
            if b.is_some() {
                return false;
            }
            *b = Some(Vec::new());
            true
        });
        Batch { outer }
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        if !self.outer {
            return;
        }
        let touched = BATCH.with(|b| b.borrow_mut().take()).unwrap_or_default();
        for mailbox in touched {
            // A permit is kept when the hand-out task is not waiting yet: no wake-up is lost.
            mailbox.notify.notify_one();
        }
    }
}

/// Give the current thread's runtime a mailbox and spawn the task that hands its answers out.
/// Call it on a current-thread runtime (every task of which runs on this thread), inside it;
/// keep the returned [`Home`] for as long as the runtime serves.
pub fn serve_here() -> Home {
    let mailbox = Arc::new(Mailbox {
        waiting: Mutex::new(Some(Vec::new())),
        notify: Notify::new(),
    });
    HOME.with(|h| *h.borrow_mut() = Some(mailbox.clone()));
    let task = tokio::spawn(hand_out(mailbox.clone()));
    Home { mailbox, task }
}

/// The task of [`serve_here`]: runs each answer left for this runtime.
async fn hand_out(mailbox: Arc<Mailbox>) {
    loop {
        mailbox.notify.notified().await;
        for delivery in mailbox.take(false) {
            delivery();
        }
    }
}

/// A runtime's mailbox while it serves. Dropping it closes the mailbox: what waits in it is
/// sent, and later answers go directly.
pub struct Home {
    mailbox: Arc<Mailbox>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Home {
    fn drop(&mut self) {
        self.task.abort();
        HOME.with(|h| {
            let mut h = h.borrow_mut();
            if h.as_ref().is_some_and(|m| Arc::ptr_eq(m, &self.mailbox)) {
                *h = None;
            }
        });
        for delivery in self.mailbox.take(true) {
            delivery();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A current-thread runtime, as a proxy shard has.
    fn shard() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    #[test]
    fn answers_sent_in_a_batch_arrive_when_it_ends_and_not_before() {
        let rt = shard();
        rt.block_on(async {
            let _home = serve_here();
            let pairs: Vec<_> = (0..5u32).map(|_| channel::<u32>()).collect();
            let (senders, mut receivers): (Vec<_>, Vec<_>) = pairs.into_iter().unzip();
            let (ended_tx, ended_rx) = std::sync::mpsc::channel();
            let writer = std::thread::spawn(move || {
                let batch = Batch::begin();
                for (i, s) in senders.into_iter().enumerate() {
                    s.send(i as u32);
                }
                // Held open: nothing may arrive yet.
                std::thread::sleep(Duration::from_millis(100));
                ended_tx.send(()).expect("signal");
                drop(batch);
            });
            let first = receivers.remove(0);
            let value = first.await.expect("answered");
            assert_eq!(value, 0);
            assert!(
                ended_rx.try_recv().is_ok(),
                "an answer arrived before its batch ended"
            );
            for (i, rx) in receivers.into_iter().enumerate() {
                assert_eq!(rx.await.expect("answered"), i as u32 + 1);
            }
            writer.join().expect("writer thread");
        });
    }

    #[test]
    fn without_a_batch_or_a_mailbox_answers_go_at_once() {
        let rt = shard();
        rt.block_on(async {
            // No mailbox on this runtime: the batch does not hold the answer back.
            let (s, rx) = channel::<&'static str>();
            let (release, held) = std::sync::mpsc::channel::<()>();
            let t = std::thread::spawn(move || {
                let _batch = Batch::begin();
                s.send("direct");
                // The batch stays open until the answer has been seen.
                let _ = held.recv_timeout(Duration::from_secs(30));
            });
            let got = tokio::time::timeout(Duration::from_secs(10), rx).await;
            assert_eq!(
                got.expect("not held by the batch").expect("answered"),
                "direct"
            );
            release.send(()).expect("release");
            t.join().expect("sender thread");
            // With a mailbox but no batch open: at once too.
            let _home = serve_here();
            let (s, rx) = channel::<u8>();
            std::thread::spawn(move || s.send(7))
                .join()
                .expect("sender");
            assert_eq!(rx.await.expect("answered"), 7);
        });
    }

    #[test]
    fn a_closed_mailbox_sends_what_waits_in_it_and_later_answers_directly() {
        let rt = shard();
        let (waiting, rx_waiting) = rt.block_on(async {
            let home = serve_here();
            let (s, rx) = channel::<u8>();
            let batch = Batch::begin();
            // Sent on this thread inside a batch: it waits in the mailbox.
            s.send(1);
            let (later, rx_later) = channel::<u8>();
            drop(home);
            drop(batch);
            (later, (rx, rx_later))
        });
        let (rx, rx_later) = rx_waiting;
        assert_eq!(rx.blocking_recv().expect("sent when the mailbox closed"), 1);
        let batch = Batch::begin();
        waiting.send(2);
        assert_eq!(rx_later.blocking_recv().expect("sent directly"), 2);
        drop(batch);
    }
}
