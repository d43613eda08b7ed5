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
    // An offer's DTLS role is always `actpass` (RFC 5763 §5); `active` or `passive` is an answer.
    let mut answer_role = None;
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
            "a" => {
                if let Some(role @ ("active" | "passive")) = value.strip_prefix("setup:").map(str::trim) {
                    answer_role = Some(role);
                }
            }
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
    if let Some(role) = answer_role {
        return Err(bad(&format!(
            "this is an answer (`a=setup:{role}`; an offer says `actpass`): send what createOffer() returns"
        )));
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

/// Check that `candidate` is an ICE candidate line as a browser's `RTCIceCandidate.candidate`
/// writes it (RFC 8839 §5.1): `candidate:<foundation> <component> <udp|tcp> <priority>
/// <address> <port> typ <host|srflx|prflx|relay> …`. The worker's ICE agent parses it fully;
/// this only makes sure a malformed one is answered instead of silently dropped there.
pub fn inspect_candidate(candidate: &str) -> Result<(), SignalError> {
    let bad = |why: &str| SignalError::new(ErrorCode::BadCandidate, format!("not an ICE candidate: {why}"));
    let line = candidate.trim();
    let line = line.strip_prefix("a=").unwrap_or(line);
    let Some(fields) = line.strip_prefix("candidate:") else {
        return Err(bad("it must start with `candidate:`"));
    };
    let f: Vec<&str> = fields.split_ascii_whitespace().collect();
    if f.len() < 8 {
        return Err(bad(
            "expected `candidate:<foundation> <component> <transport> <priority> <address> <port> typ <type>`",
        ));
    }
    if f[1].parse::<u16>().map_or(true, |c| c == 0) {
        return Err(bad("the component must be a number from 1"));
    }
    if !f[2].eq_ignore_ascii_case("udp") && !f[2].eq_ignore_ascii_case("tcp") {
        return Err(bad("the transport must be udp or tcp"));
    }
    if f[3].parse::<u32>().is_err() {
        return Err(bad("the priority must be a number"));
    }
    if f[4].is_empty() || f[4].len() > 255 {
        return Err(bad("the address is missing or too long"));
    }
    if f[5].parse::<u16>().is_err() {
        return Err(bad("the port must be a number from 0 to 65535"));
    }
    if f[6] != "typ" || !matches!(f[7], "host" | "srflx" | "prflx" | "relay") {
        return Err(bad("`typ` must be followed by host, srflx, prflx or relay"));
    }
    Ok(())
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

    #[test]
    fn an_answer_sent_as_an_offer_is_named() {
        let offer = format!("{NO_MEDIA}m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=setup:actpass\r\n");
        assert!(inspect_offer(&offer).is_ok());
        for role in ["active", "passive"] {
            let answer = offer.replace("actpass", role);
            let err = inspect_offer(&answer).expect_err(role);
            assert_eq!(err.code, ErrorCode::BadSdp);
            assert!(err.message.contains("answer"), "{}", err.message);
        }
    }

    #[test]
    fn candidates_are_checked_for_shape() {
        for ok in [
            "candidate:842163049 1 udp 1677729535 203.0.113.7 46154 typ srflx raddr 0.0.0.0 rport 0 generation 0",
            "candidate:1 1 UDP 2122252543 2001:db8::1 50000 typ host",
            "a=candidate:3 1 tcp 1518280447 192.0.2.1 9 typ host tcptype active",
            "candidate:4 1 udp 2122260223 4b1c2d3e-aaaa-bbbb-cccc-0123456789ab.local 5000 typ host",
        ] {
            assert!(inspect_candidate(ok).is_ok(), "{ok}");
        }
        for bad in [
            "hello",
            "candidate:",
            "candidate:1 1 udp 2122252543 192.0.2.1",
            "candidate:1 x udp 2122252543 192.0.2.1 5000 typ host",
            "candidate:1 1 sctp 2122252543 192.0.2.1 5000 typ host",
            "candidate:1 1 udp -5 192.0.2.1 5000 typ host",
            "candidate:1 1 udp 2122252543 192.0.2.1 70000 typ host",
            "candidate:1 1 udp 2122252543 192.0.2.1 5000 type host",
            "candidate:1 1 udp 2122252543 192.0.2.1 5000 typ banana",
        ] {
            assert_eq!(
                inspect_candidate(bad).expect_err(bad).code,
                ErrorCode::BadCandidate,
                "{bad}"
            );
        }
    }
}
