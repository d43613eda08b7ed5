//! A quick structural look at an SDP offer, done before any worker is touched.
//!
//! This is not a full SDP parser — the worker's WebRTC stack does that. It only catches what can
//! be told from the text and deserves a precise answer: text that is not SDP at all, and an offer
//! without media sections. The latter is what the customer's test page sends: it calls
//! `createOffer()` before adding any transceiver or track, so the offer has no `m=` line and no
//! answer can add one. We say so, with the fix, instead of answering an SDP that can never play.

use crate::signaling::{ErrorCode, SignalError};

/// What an offer asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OfferSummary {
    pub video_sections: usize,
    pub audio_sections: usize,
    pub other_sections: usize,
}

/// The message sent with [`ErrorCode::OfferWithoutMedia`]; integrators search for it.
pub const OFFER_WITHOUT_MEDIA_HELP: &str =
    "the offer has no media sections (no m= line), so no answer can carry video. \
The page called createOffer() before adding any transceiver or track. Fix: call \
pc.addTransceiver('video', {direction: 'recvonly'}) and pc.addTransceiver('audio', {direction: 'recvonly'}) \
before createOffer(). See docs/integration.md.";

/// Check that `sdp` is an SDP session description with at least one video section.
pub fn inspect_offer(sdp: &str) -> Result<OfferSummary, SignalError> {
    let bad = |why: &str| SignalError::new(ErrorCode::BadSdp, format!("not an SDP offer: {why}"));
    let mut lines = sdp
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .filter(|l| !l.is_empty());
    if lines.next() != Some("v=0") {
        return Err(bad("it must start with the line `v=0`"));
    }
    let mut summary = OfferSummary::default();
    let (mut origin, mut session_name) = (false, false);
    for line in lines {
        let Some((key, value)) = line.split_once('=') else {
            return Err(bad("every line must be `<letter>=<value>`"));
        };
        if key.len() != 1 || !key.bytes().all(|b| b.is_ascii_lowercase()) {
            return Err(bad("every line must be `<letter>=<value>`"));
        }
        match key {
            "o" => origin = true,
            "s" => session_name = true,
            "m" => match value.split(' ').next() {
                Some("video") => summary.video_sections += 1,
                Some("audio") => summary.audio_sections += 1,
                _ => summary.other_sections += 1,
            },
            _ => {}
        }
    }
    if !origin || !session_name {
        return Err(bad("the `o=` and `s=` lines are required"));
    }
    if summary.video_sections + summary.audio_sections + summary.other_sections == 0 {
        return Err(SignalError::new(ErrorCode::OfferWithoutMedia, OFFER_WITHOUT_MEDIA_HELP));
    }
    if summary.video_sections == 0 {
        return Err(SignalError::new(
            ErrorCode::OfferWithoutMedia,
            "the offer has no video section, so the avatar cannot be sent. Call \
             pc.addTransceiver('video', {direction: 'recvonly'}) before createOffer().",
        ));
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO_MEDIA: &str = "v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=extmap-allow-mixed\r\na=msid-semantic: WMS\r\n";

    #[test]
    fn customer_page_offer_without_media_gets_the_fix() {
        let err = inspect_offer(NO_MEDIA).expect_err("no media");
        assert_eq!(err.code, ErrorCode::OfferWithoutMedia);
        assert!(err.message.contains("addTransceiver('video'"));
    }

    #[test]
    fn offer_with_video_and_audio_passes() {
        let sdp = format!(
            "{NO_MEDIA}m=video 9 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"
        );
        let s = inspect_offer(&sdp).expect("ok");
        assert_eq!((s.video_sections, s.audio_sections), (1, 1));
        // LF-only line endings are accepted too.
        assert!(inspect_offer(&sdp.replace("\r\n", "\n")).is_ok());
    }

    #[test]
    fn audio_only_offer_is_refused() {
        let sdp = format!("{NO_MEDIA}m=audio 9 UDP/TLS/RTP/SAVPF 111\r\n");
        assert_eq!(
            inspect_offer(&sdp).expect_err("audio only").code,
            ErrorCode::OfferWithoutMedia
        );
    }

    #[test]
    fn garbage_is_bad_sdp() {
        for s in [
            "",
            "hello",
            "v=1\r\n",
            "v=0\r\nnonsense\r\n",
            "v=0\r\nXY=1\r\n",
            "v=0\r\nm=video 9 RTP 96\r\n",
        ] {
            assert_eq!(inspect_offer(s).expect_err(s).code, ErrorCode::BadSdp, "{s:?}");
        }
    }
}
