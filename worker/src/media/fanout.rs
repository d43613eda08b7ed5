//! A session's media, to every sink that wants it.
//!
//! The media clock ([`super::stream`]) encodes each picture and each 20 ms of speech once. The
//! session's viewer gets them through the sender that paces them to its bandwidth
//! ([`super::send`]). Further sinks (a recording, a second viewer) join through [`Taps::join`]
//! and get the same encoded media from then on:
//!
//! ```text
//!                         ┌─▶ viewer (paced, adapts the encoder)
//!  media clock ─encoded─▶ │
//!                         ├─▶ tap "recording"   (from the next keyframe)
//!                         └─▶ tap ...
//! ```
//!
//! A tap can never slow the viewer: the clock offers it each packet without waiting
//! ([`Taps::offer`]), and a tap that is full loses the packet. Video then has a hole, so the tap
//! skips video until the next keyframe (audio goes on), and the loss is counted. It does not ask
//! for that keyframe: a slow recorder must not cost the viewer's bandwidth; the next one comes
//! within the encoder's keyframe interval (`video.gop`). A sink that
//! joins asks for a keyframe, so its first picture comes at once, not at the end of the GOP. A
//! tap whose receiver is dropped leaves.
//!
//! The pictures a tap gets are the viewer's: the encoder follows the viewer's bandwidth, so a
//! viewer on a weak link lowers what a recording of the session gets too.

use super::stream::MediaOut;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// One sink beyond the viewer.
struct Tap {
    name: String,
    tx: mpsc::Sender<MediaOut>,
    /// Video waits for a keyframe: at the start, and after a loss.
    want_keyframe: bool,
    dropped: u64,
}

#[derive(Default)]
struct Inner {
    taps: Vec<Tap>,
    /// The running clock's keyframe request, if a clock runs.
    keyframe: Option<Arc<AtomicBool>>,
}

/// The sinks that joined a session's media (cheap to clone: one list, shared). The list outlives
/// each peer: when the browser renegotiates, the new clock feeds the same sinks.
#[derive(Clone, Default)]
pub struct Taps {
    inner: Arc<Mutex<Inner>>,
}

impl Taps {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A clock starts feeding the sinks: `keyframe` is the flag it reads to encode the next
    /// picture as a keyframe. Every sink waits for that keyframe (it is asked for now).
    pub fn attach(&self, keyframe: Arc<AtomicBool>) {
        let mut inner = self.lock();
        if !inner.taps.is_empty() {
            keyframe.store(true, Ordering::Release);
        }
        for tap in &mut inner.taps {
            tap.want_keyframe = true;
        }
        inner.keyframe = Some(keyframe);
    }

    /// Join: the session's encoded media from the next keyframe on (asked for now), in a channel
    /// of `capacity` packets. Drop the receiver to leave.
    pub fn join(&self, name: &str, capacity: usize) -> mpsc::Receiver<MediaOut> {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let mut inner = self.lock();
        inner.taps.push(Tap {
            name: name.to_owned(),
            tx,
            want_keyframe: true,
            dropped: 0,
        });
        if let Some(keyframe) = &inner.keyframe {
            keyframe.store(true, Ordering::Release);
        }
        rx
    }

    /// Sinks joined now.
    pub fn len(&self) -> usize {
        self.lock().taps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Packets each sink lost because it was full, by name.
    pub fn dropped(&self) -> Vec<(String, u64)> {
        self.lock().taps.iter().map(|t| (t.name.clone(), t.dropped)).collect()
    }

    /// Offer one packet to every sink, never waiting (called by the media clock for each packet
    /// it also gives the viewer). `keyframe`: whether a video packet is a keyframe.
    pub fn offer(&self, media: &MediaOut, keyframe: bool) {
        let mut inner = self.lock();
        inner.taps.retain_mut(|tap| {
            if let MediaOut::Video(_) = media {
                if tap.want_keyframe && !keyframe {
                    return true; // a picture it cannot decode: wait for the next keyframe
                }
            }
            match tap.tx.try_send(media.clone()) {
                Ok(()) => {
                    if let MediaOut::Video(_) = media {
                        tap.want_keyframe = false;
                    }
                    true
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    tap.dropped += 1;
                    tap.want_keyframe = true;
                    metrics::counter!("worker_media_tap_dropped_total").increment(1);
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::stream::EncodedFrame;
    use bytes::Bytes;

    fn video(n: u8) -> MediaOut {
        MediaOut::Video(EncodedFrame {
            data: Bytes::from(vec![n]),
            rtp_timestamp: u32::from(n),
        })
    }

    fn audio(n: u8) -> MediaOut {
        MediaOut::Audio(Bytes::from(vec![n]))
    }

    fn label(m: &MediaOut) -> String {
        match m {
            MediaOut::Video(f) => format!("v{}", f.data[0]),
            MediaOut::Audio(a) => format!("a{}", a[0]),
        }
    }

    fn drain(rx: &mut mpsc::Receiver<MediaOut>) -> Vec<String> {
        std::iter::from_fn(|| rx.try_recv().ok()).map(|m| label(&m)).collect()
    }

    #[test]
    fn a_sink_that_joins_asks_for_a_keyframe_and_starts_there() {
        let keyframe = Arc::new(AtomicBool::new(false));
        let taps = Taps::default();
        taps.attach(Arc::clone(&keyframe));
        assert!(!keyframe.load(Ordering::Acquire), "no sink, no keyframe asked");
        taps.offer(&video(0), true); // nobody there yet
        let mut rx = taps.join("recording", 16);
        assert!(
            keyframe.load(Ordering::Acquire),
            "joining asks the clock for a keyframe"
        );
        taps.offer(&video(1), false);
        taps.offer(&audio(1), false);
        taps.offer(&video(2), true);
        taps.offer(&video(3), false);
        assert_eq!(drain(&mut rx), ["a1", "v2", "v3"]);
    }

    #[test]
    fn a_full_sink_loses_packets_and_resumes_at_a_keyframe_and_a_dropped_one_leaves() {
        let taps = Taps::default();
        let mut slow = taps.join("slow", 2);
        let fast = taps.join("fast", 64);
        for (n, key) in [(1, true), (2, false), (3, false), (4, false)] {
            taps.offer(&video(n), key);
        }
        // v3 found it full and was lost; v4 refers to v3, so it was skipped, not sent.
        assert_eq!(taps.dropped(), [("slow".to_owned(), 1), ("fast".to_owned(), 0)]);
        assert_eq!(drain(&mut slow), ["v1", "v2"]);
        // Room again, but v5 refers to pictures it lost: it waits for the keyframe.
        taps.offer(&video(5), false);
        taps.offer(&audio(5), false);
        taps.offer(&video(6), true);
        assert_eq!(drain(&mut slow), ["a5", "v6"]);
        drop(fast);
        taps.offer(&audio(7), false);
        assert_eq!(taps.len(), 1, "the dropped receiver left");
    }

    #[test]
    fn a_new_clock_after_renegotiation_feeds_the_same_sinks_from_its_first_keyframe() {
        let taps = Taps::default();
        let mut rx = taps.join("recording", 16); // before any clock: nothing to ask yet
        let first = Arc::new(AtomicBool::new(false));
        taps.attach(Arc::clone(&first));
        assert!(
            first.load(Ordering::Acquire),
            "the sink waiting asks the new clock for a keyframe"
        );
        taps.offer(&video(1), true);
        taps.offer(&video(2), false);
        taps.attach(Arc::new(AtomicBool::new(false)));
        taps.offer(&video(3), false); // the new clock's pictures start at its keyframe
        taps.offer(&video(4), true);
        assert_eq!(drain(&mut rx), ["v1", "v2", "v4"]);
    }
}
