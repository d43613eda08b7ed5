//! Audio uploads for the session API's `POST /api/v1/sessions/{id}/audio`: the formats it takes,
//! decoded as the body streams in (no I/O here).
//!
//! The body is the backend's own speech, 16-bit PCM, in one of two forms:
//!
//! * `audio/wav` (also `audio/x-wav`, `audio/wave`): a RIFF/WAVE file, PCM 16-bit, mono or
//!   stereo, any rate from 8 to 48 kHz. The header is read first ([`parse_wav_header`]); a
//!   streaming writer's placeholder sizes (0, `0x7FFFFFFF` or `0xFFFFFFFF`) mean "to the end
//!   of the body".
//! * `audio/L16;rate=N[;channels=C]`: raw samples, big-endian as RFC 2586 defines L16; or
//!   `audio/pcm;rate=N[;channels=C]`, the same little-endian (what most TTS engines write).
//!
//! Either way [`Samples`] turns the bytes into mono 16-bit little-endian PCM, the form the
//! worker takes ([`avatar_proto::api::Command::Audio`]), whatever chunk boundaries the upload
//! has: a sample split across two chunks is joined, stereo is averaged.

use avatar_proto::api::AUDIO_RATES;

/// The longest WAV header read before its `data` chunk must have started.
pub const MAX_HEADER: usize = 64 * 1024;
/// Chunks before `data` (writers put `fmt `, perhaps `LIST` or `fact`): the header is parsed again
/// as each piece of the body arrives, so its cost must not grow with a header of many tiny chunks.
pub const MAX_CHUNKS: usize = 16;

/// Why an upload is refused (the API answers 415).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("Content-Type `{0}` is not taken; send audio/wav, audio/L16;rate=N or audio/pcm;rate=N")]
    ContentType(String),
    #[error("`{0}` needs a rate parameter, e.g. `{0};rate=16000`")]
    NoRate(String),
    #[error("a sample rate of {0} Hz is not taken (8000–48000)")]
    Rate(u32),
    #[error("{0} channels are not taken (mono or stereo)")]
    Channels(u16),
    #[error("not a WAV file: {0}")]
    Wav(&'static str),
    #[error("the WAV file is {0}; send 16-bit PCM")]
    WavEncoding(String),
}

/// What the body holds, from its Content-Type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Wav,
    Raw(Spec),
}

/// Raw PCM's layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spec {
    pub rate: u32,
    pub channels: u16,
    pub big_endian: bool,
}

impl Spec {
    fn checked(self) -> Result<Self, FormatError> {
        if !AUDIO_RATES.contains(&self.rate) {
            return Err(FormatError::Rate(self.rate));
        }
        if !(1..=2).contains(&self.channels) {
            return Err(FormatError::Channels(self.channels));
        }
        Ok(self)
    }
}

/// The format a Content-Type names.
pub fn format_of(content_type: &str) -> Result<Format, FormatError> {
    let mut parts = content_type.split(';').map(str::trim);
    let media = parts.next().unwrap_or_default().to_ascii_lowercase();
    let big_endian = match media.as_str() {
        "audio/wav" | "audio/x-wav" | "audio/wave" | "audio/vnd.wave" => return Ok(Format::Wav),
        "audio/l16" => true,
        "audio/pcm" => false,
        _ => return Err(FormatError::ContentType(content_type.to_owned())),
    };
    let (mut rate, mut channels) = (None, 1u16);
    for param in parts {
        let Some((name, value)) = param.split_once('=') else {
            continue;
        };
        let value = value.trim().trim_matches('"');
        match name.trim().to_ascii_lowercase().as_str() {
            "rate" => rate = Some(value.parse().map_err(|_| FormatError::NoRate(media.clone()))?),
            "channels" => channels = value.parse().map_err(|_| FormatError::Channels(0))?,
            _ => {}
        }
    }
    let rate = rate.ok_or(FormatError::NoRate(media))?;
    Spec {
        rate,
        channels,
        big_endian,
    }
    .checked()
    .map(Format::Raw)
}

/// A parsed WAV header: the layout, where the samples start, and how many bytes of them the
/// header announces (`None`: to the end of the body).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WavHeader {
    pub spec: Spec,
    pub data_offset: usize,
    pub data_len: Option<u64>,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Read a WAV header from the start of the body: `Ok(None)` while more bytes are needed.
pub fn parse_wav_header(b: &[u8]) -> Result<Option<WavHeader>, FormatError> {
    if b.len() < 12 {
        return Ok(None);
    }
    if &b[0..4] != b"RIFF" || &b[8..12] != b"WAVE" {
        return Err(FormatError::Wav("it does not start with RIFF....WAVE"));
    }
    let mut spec = None;
    let mut pos = 12;
    for _ in 0..MAX_CHUNKS {
        if pos + 8 > b.len() {
            return if b.len() >= MAX_HEADER {
                Err(FormatError::Wav("no data chunk in the first 64 KiB"))
            } else {
                Ok(None)
            };
        }
        let size = u32_at(b, pos + 4);
        let body = pos + 8;
        match &b[pos..pos + 4] {
            b"fmt " => {
                if size < 16 {
                    return Err(FormatError::Wav("its fmt chunk is too short"));
                }
                if body + 16 > b.len() {
                    return Ok(None);
                }
                let tag = u16_at(b, body);
                let channels = u16_at(b, body + 2);
                let rate = u32_at(b, body + 4);
                let bits = u16_at(b, body + 14);
                // 1: PCM; 0xFFFE: WAVE_FORMAT_EXTENSIBLE, which PCM writers use for > 2 channels
                // or > 16 bits (its bits are checked just the same).
                if !matches!(tag, 1 | 0xFFFE) || bits != 16 {
                    let what = if tag == 3 {
                        format!("{bits}-bit float")
                    } else {
                        format!("format {tag}, {bits}-bit")
                    };
                    return Err(FormatError::WavEncoding(what));
                }
                spec = Some(
                    Spec {
                        rate,
                        channels,
                        big_endian: false,
                    }
                    .checked()?,
                );
            }
            b"data" => {
                let spec = spec.ok_or(FormatError::Wav("its data chunk comes before fmt"))?;
                // Streaming writers put 0, 0x7FFFFFFF (espeak-ng --stdout) or 0xFFFFFFFF there.
                let data_len = (size != 0 && size < 0x7FFF_F000).then_some(u64::from(size));
                return Ok(Some(WavHeader {
                    spec,
                    data_offset: body,
                    data_len,
                }));
            }
            _ => {}
        }
        // Chunks are padded to an even size.
        pos = body + size as usize + (size as usize & 1);
        if pos > MAX_HEADER {
            return Err(FormatError::Wav("no data chunk in the first 64 KiB"));
        }
    }
    Err(FormatError::Wav("more than 16 chunks before the data chunk"))
}

/// Bytes of PCM in, mono 16-bit little-endian out, across any chunk boundaries.
#[derive(Debug)]
pub struct Samples {
    spec: Spec,
    /// Bytes of a frame that the last chunk cut.
    carry: Vec<u8>,
    /// Bytes still to take (the WAV header's data size), if bounded.
    left: Option<u64>,
    frames: u64,
}

impl Samples {
    pub fn new(spec: Spec, data_len: Option<u64>) -> Self {
        Self {
            spec,
            carry: Vec::new(),
            left: data_len,
            frames: 0,
        }
    }

    /// Decode the next bytes of the body, appending little-endian mono samples to `out`.
    /// Bytes past the announced data size (a WAV's trailing chunks) are ignored.
    pub fn push(&mut self, mut bytes: &[u8], out: &mut Vec<u8>) {
        if let Some(left) = self.left.as_mut() {
            let take = bytes.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
            bytes = &bytes[..take];
            *left -= take as u64;
        }
        let frame = 2 * usize::from(self.spec.channels);
        let sample = |b: &[u8]| -> i32 {
            i32::from(if self.spec.big_endian {
                i16::from_be_bytes([b[0], b[1]])
            } else {
                i16::from_le_bytes([b[0], b[1]])
            })
        };
        let mut emit = |f: &[u8]| {
            let sum: i32 = f.chunks_exact(2).map(sample).sum();
            let mono = (sum / i32::from(self.spec.channels)) as i16;
            out.extend_from_slice(&mono.to_le_bytes());
        };
        if !self.carry.is_empty() {
            let need = frame - self.carry.len();
            let take = need.min(bytes.len());
            self.carry.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.carry.len() < frame {
                return;
            }
            emit(&self.carry);
            self.frames += 1;
            self.carry.clear();
        }
        let whole = bytes.len() / frame * frame;
        for f in bytes[..whole].chunks_exact(frame) {
            emit(f);
        }
        self.frames += (whole / frame) as u64;
        self.carry.extend_from_slice(&bytes[whole..]);
    }

    /// Seconds of audio decoded so far.
    pub fn seconds(&self) -> f64 {
        self.frames as f64 / f64::from(self.spec.rate)
    }

    /// Whether the announced data size has all arrived.
    pub fn complete(&self) -> bool {
        self.left == Some(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wav(rate: u32, channels: u16, bits: u16, extra: &[u8], samples: &[i16], data_len: Option<u32>) -> Vec<u8> {
        let data: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
        let mut b = b"RIFF\0\0\0\0WAVE".to_vec();
        b.extend_from_slice(b"fmt \x10\0\0\0");
        b.extend_from_slice(&1u16.to_le_bytes());
        b.extend_from_slice(&channels.to_le_bytes());
        b.extend_from_slice(&rate.to_le_bytes());
        b.extend_from_slice(&(rate * u32::from(channels) * 2).to_le_bytes());
        b.extend_from_slice(&(channels * 2).to_le_bytes());
        b.extend_from_slice(&bits.to_le_bytes());
        b.extend_from_slice(extra);
        b.extend_from_slice(b"data");
        b.extend_from_slice(&data_len.unwrap_or(data.len() as u32).to_le_bytes());
        b.extend_from_slice(&data);
        b
    }

    #[test]
    fn content_types_name_their_layout_and_others_are_refused() {
        assert_eq!(format_of("audio/wav"), Ok(Format::Wav));
        assert_eq!(format_of("Audio/X-WAV; codecs=1"), Ok(Format::Wav));
        let l16 = format_of("audio/L16; rate=24000").expect("l16");
        assert_eq!(
            l16,
            Format::Raw(Spec {
                rate: 24000,
                channels: 1,
                big_endian: true
            })
        );
        let pcm = format_of("audio/pcm;rate=\"16000\";channels=2").expect("pcm");
        assert_eq!(
            pcm,
            Format::Raw(Spec {
                rate: 16000,
                channels: 2,
                big_endian: false
            })
        );
        assert_eq!(format_of("audio/L16"), Err(FormatError::NoRate("audio/l16".into())));
        assert_eq!(format_of("audio/L16;rate=96000"), Err(FormatError::Rate(96000)));
        assert_eq!(
            format_of("audio/pcm;rate=16000;channels=6"),
            Err(FormatError::Channels(6))
        );
        assert!(matches!(format_of("audio/mpeg"), Err(FormatError::ContentType(_))));
        assert!(matches!(
            format_of("application/json"),
            Err(FormatError::ContentType(_))
        ));
    }

    #[test]
    fn a_wav_header_is_read_past_other_chunks_and_waits_for_more_bytes() {
        let file = wav(22050, 1, 16, b"LIST\x04\0\0\0abcd", &[1, -2, 3], None);
        for cut in 0..file.len() - 6 {
            assert_eq!(parse_wav_header(&file[..cut]), Ok(None), "cut at {cut}");
        }
        let h = parse_wav_header(&file).expect("valid").expect("whole");
        assert_eq!(h.spec.rate, 22050);
        assert_eq!((h.data_offset, h.data_len), (file.len() - 6, Some(6)));
        // A streaming writer's placeholder: to the end of the body.
        for placeholder in [0, 0x7FFF_FFFF, u32::MAX] {
            let streaming = wav(16000, 1, 16, b"", &[0; 4], Some(placeholder));
            assert_eq!(parse_wav_header(&streaming).expect("ok").expect("whole").data_len, None);
        }
    }

    #[test]
    fn wavs_that_are_not_16_bit_pcm_are_refused_with_what_they_are() {
        assert_eq!(
            parse_wav_header(&wav(16000, 1, 24, b"", &[], None)),
            Err(FormatError::WavEncoding("format 1, 24-bit".into()))
        );
        assert_eq!(
            parse_wav_header(&wav(4000, 1, 16, b"", &[], None)),
            Err(FormatError::Rate(4000))
        );
        assert!(matches!(
            parse_wav_header(b"OggS\0\0\0\0\0\0\0\0\0\0"),
            Err(FormatError::Wav(_))
        ));
        let mut no_data = b"RIFF\0\0\0\0WAVE".to_vec();
        while no_data.len() < MAX_HEADER + 16 {
            no_data.extend_from_slice(b"junk\x00\x10\0\0");
            no_data.resize(no_data.len() + 4096, 0);
        }
        assert!(matches!(parse_wav_header(&no_data), Err(FormatError::Wav(_))));
        // Many empty chunks: refused after a few, however the body is cut.
        let mut tiny = b"RIFF\0\0\0\0WAVE".to_vec();
        for _ in 0..1000 {
            tiny.extend_from_slice(b"junk\0\0\0\0");
        }
        assert_eq!(
            parse_wav_header(&tiny),
            Err(FormatError::Wav("more than 16 chunks before the data chunk"))
        );
    }

    #[test]
    fn samples_are_joined_across_chunks_averaged_to_mono_and_byte_swapped() {
        // Stereo big-endian, cut at every odd place.
        let frames: Vec<(i16, i16)> = vec![(100, 300), (-1000, -3000), (i16::MAX, i16::MAX), (1, 2)];
        let bytes: Vec<u8> = frames
            .iter()
            .flat_map(|(l, r)| l.to_be_bytes().into_iter().chain(r.to_be_bytes()))
            .collect();
        let spec = Spec {
            rate: 8000,
            channels: 2,
            big_endian: true,
        };
        let mut samples = Samples::new(spec, None);
        let mut out = Vec::new();
        for piece in bytes.chunks(3) {
            samples.push(piece, &mut out);
        }
        let mono: Vec<i16> = out.chunks_exact(2).map(|b| i16::from_le_bytes([b[0], b[1]])).collect();
        assert_eq!(mono, vec![200, -2000, i16::MAX, 1]);
        assert!((samples.seconds() - 4.0 / 8000.0).abs() < 1e-9);
        // A WAV's announced size: trailing chunks after the data are not audio.
        let mut bounded = Samples::new(
            Spec {
                rate: 8000,
                channels: 1,
                big_endian: false,
            },
            Some(4),
        );
        let mut out = Vec::new();
        bounded.push(&[1, 0, 2, 0, b'L', b'I', b'S', b'T'], &mut out);
        assert_eq!(out, vec![1, 0, 2, 0]);
        assert!(bounded.complete());
    }
}
