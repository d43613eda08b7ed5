//! What the relay serves of the avatars a worker announces.
//!
//! A worker's registration may carry a preview image per avatar, base64 in the tunnel frame. The
//! relay hands those bytes to web pages as `image/jpeg`, so it checks them twice with the same
//! rule: when the worker registers (anything else is dropped from the registration) and again when
//! a page asks for one. The rule lives here, apart from both, as a pure function over the
//! announced string: it needs no state, no socket and nothing else from this crate.

/// The JPEG in a worker's base64 avatar preview, if it is one and small enough to serve.
///
/// `None` for anything that is not base64, does not start with the JPEG magic bytes (a PNG, an
/// HTML page), or decodes to more than [`MAX_AVATAR_PREVIEW_LEN`] bytes. Oversized input is
/// refused by its length before it is decoded, so a large announcement costs no allocation.
///
/// [`MAX_AVATAR_PREVIEW_LEN`]: avatar_proto::tunnel::MAX_AVATAR_PREVIEW_LEN
pub(crate) fn preview_bytes(base64_jpeg: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    if base64_jpeg.len() > avatar_proto::tunnel::MAX_AVATAR_PREVIEW_LEN.div_ceil(3) * 4 {
        return None;
    }
    let bytes = base64::engine::general_purpose::STANDARD.decode(base64_jpeg).ok()?;
    (bytes.len() <= avatar_proto::tunnel::MAX_AVATAR_PREVIEW_LEN && bytes.starts_with(&[0xFF, 0xD8, 0xFF]))
        .then_some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_small_jpegs_are_served_as_avatar_previews() {
        use base64::Engine as _;
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
        let jpeg = [&[0xFF, 0xD8, 0xFF, 0xE0][..], &[7u8; 100][..]].concat();
        assert_eq!(preview_bytes(&b64(&jpeg)), Some(jpeg.clone()));
        // A PNG, or an HTML page, is not served as a JPEG; nor is too large a JPEG, or no base64.
        assert_eq!(preview_bytes(&b64(b"\x89PNG\r\n\x1a\n....")), None);
        assert_eq!(preview_bytes(&b64(b"<script>alert(1)</script>")), None);
        let big = [
            &[0xFF, 0xD8, 0xFF][..],
            &vec![0u8; avatar_proto::tunnel::MAX_AVATAR_PREVIEW_LEN][..],
        ]
        .concat();
        assert_eq!(preview_bytes(&b64(&big)), None);
        assert_eq!(preview_bytes("not base64!"), None);
    }
}
