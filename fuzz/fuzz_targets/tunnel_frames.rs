//! The tunnel frame reader: any byte stream, fed in any chunking, never a panic and never a frame
//! above the limit.
#![no_main]

use avatar_proto::tunnel::{Control, FrameDecoder, SessionFrame, MAX_FRAME_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, rest)) = data.split_first() else { return };
    let chunk = (chunk as usize % 64) + 1;
    let mut control = FrameDecoder::default();
    let mut session = FrameDecoder::new(4096);
    for piece in rest.chunks(chunk) {
        control.push(piece);
        session.push(piece);
        loop {
            match control.next_frame() {
                Ok(Some(frame)) => {
                    assert!(frame.len() <= MAX_FRAME_LEN);
                    let _ = serde_json::from_slice::<Control>(&frame);
                }
                Ok(None) | Err(_) => break,
            }
        }
        while let Ok(Some(_)) = session.next_message::<SessionFrame>() {}
    }
    let _ = control.finish();
});
