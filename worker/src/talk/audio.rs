//! Speech audio between the stages: mono `f32` PCM at some rate, WAV decoding, resampling.
//!
//! TTS engines speak at their own rates (espeak-ng 22.05 kHz, OpenAI 24 kHz); the pipeline needs
//! 16 kHz for the lip-sync features and 48 kHz for Opus. [`resample`] converts one sentence at a
//! time with rubato's FFT resampler (band-limited, so no aliasing) and trims its delay so that
//! sentence boundaries line up with the video clock.

use rubato::{FftFixedInOut, Resampler};

/// Mono PCM, samples in [−1, 1].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pcm {
    pub rate: u32,
    pub samples: Vec<f32>,
}

impl Pcm {
    pub fn seconds(&self) -> f64 {
        if self.rate == 0 {
            0.0
        } else {
            self.samples.len() as f64 / self.rate as f64
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AudioError {
    #[error("not a WAV file: {0}")]
    Wav(#[from] hound::Error),
    #[error("unsupported WAV format: {0}")]
    Format(String),
    #[error("resampling {from} Hz to {to} Hz: {message}")]
    Resample { from: u32, to: u32, message: String },
}

/// Decode a WAV file (8/16/24/32-bit integer or 32-bit float; channels are averaged to mono).
/// Streams that write a placeholder length (`0xFFFFFFFF`, as some TTS servers and
/// `espeak-ng --stdout` do) are read to the end.
pub fn decode_wav(bytes: &[u8]) -> Result<Pcm, AudioError> {
    let fixed = fix_streaming_header(bytes);
    let mut reader = hound::WavReader::new(std::io::Cursor::new(fixed.as_ref()))?;
    let spec = reader.spec();
    if spec.channels == 0 || spec.sample_rate == 0 {
        return Err(AudioError::Format(format!("{spec:?}")));
    }
    let interleaved: Vec<f32> = match spec.sample_format {
        hound::SampleFormat::Float if spec.bits_per_sample == 32 => {
            reader.samples::<f32>().collect::<Result<_, _>>()?
        }
        hound::SampleFormat::Int if (8..=32).contains(&spec.bits_per_sample) => {
            let scale = 1.0 / (1u64 << (spec.bits_per_sample - 1)) as f32;
            reader
                .samples::<i32>()
                .map(|s| s.map(|v| v as f32 * scale))
                .collect::<Result<_, _>>()?
        }
        _ => return Err(AudioError::Format(format!("{spec:?}"))),
    };
    let ch = spec.channels as usize;
    let samples = interleaved
        .chunks_exact(ch)
        .map(|frame| frame.iter().sum::<f32>() / ch as f32)
        .collect();
    Ok(Pcm {
        rate: spec.sample_rate,
        samples,
    })
}

/// Replace placeholder RIFF/data sizes with the real ones so `hound` reads the whole stream.
fn fix_streaming_header(bytes: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if bytes.len() < 12 || &bytes[0..4] != b"RIFF" || &bytes[8..12] != b"WAVE" {
        return bytes.into();
    }
    let mut out = bytes.to_vec();
    let riff = (out.len() - 8) as u32;
    out[4..8].copy_from_slice(&riff.to_le_bytes());
    let mut pos = 12;
    while pos + 8 <= out.len() {
        let size = u32::from_le_bytes([out[pos + 4], out[pos + 5], out[pos + 6], out[pos + 7]]) as usize;
        if &out[pos..pos + 4] == b"data" {
            let real = (out.len() - pos - 8) as u32;
            if size > real as usize || size == 0 {
                out[pos + 4..pos + 8].copy_from_slice(&real.to_le_bytes());
            }
            break;
        }
        pos += 8 + size + (size & 1);
    }
    out.into()
}

/// Resample a whole sentence. The output has `round(len · to / from)` samples.
pub fn resample(pcm: &Pcm, to: u32) -> Result<Vec<f32>, AudioError> {
    if pcm.rate == to || pcm.samples.is_empty() {
        return Ok(pcm.samples.clone());
    }
    let err = |message: String| AudioError::Resample {
        from: pcm.rate,
        to,
        message,
    };
    let mut rs = FftFixedInOut::<f32>::new(pcm.rate as usize, to as usize, 1024, 1).map_err(|e| err(e.to_string()))?;
    let want = (pcm.samples.len() as u64 * to as u64 + pcm.rate as u64 / 2) / pcm.rate as u64;
    let delay = rs.output_delay();
    let mut out = Vec::with_capacity(want as usize + delay + rs.output_frames_max());
    let mut rest = &pcm.samples[..];
    while rest.len() >= rs.input_frames_next() {
        let n = rs.input_frames_next();
        let chunk = rs.process(&[&rest[..n]], None).map_err(|e| err(e.to_string()))?;
        out.extend_from_slice(&chunk[0]);
        rest = &rest[n..];
    }
    // Feed the tail and then silence until the delayed output has all come out.
    let mut first = true;
    while out.len() < want as usize + delay {
        let chunk = if first {
            rs.process_partial(Some(&[rest]), None)
        } else {
            rs.process_partial::<&[f32]>(None, None)
        }
        .map_err(|e| err(e.to_string()))?;
        first = false;
        out.extend_from_slice(&chunk[0]);
    }
    out.drain(..delay);
    out.truncate(want as usize);
    Ok(out)
}

/// [`resample`] for audio that arrives in pieces (the session API's uploads): each
/// [`StreamResampler::push`] returns what the pieces so far make, and [`StreamResampler::finish`]
/// the rest, so that all of it is `round(len · to / from)` samples, aligned like [`resample`]'s.
pub struct StreamResampler {
    from: u32,
    to: u32,
    /// `None` when the rates are equal.
    rs: Option<FftFixedInOut<f32>>,
    pending: Vec<f32>,
    /// Output samples still to drop (the resampler's delay).
    skip: usize,
    taken: u64,
    given: u64,
}

impl StreamResampler {
    pub fn new(from: u32, to: u32) -> Result<Self, AudioError> {
        let rs = if from == to {
            None
        } else {
            Some(
                FftFixedInOut::<f32>::new(from as usize, to as usize, 1024, 1).map_err(|e| AudioError::Resample {
                    from,
                    to,
                    message: e.to_string(),
                })?,
            )
        };
        let skip = rs.as_ref().map_or(0, |r| r.output_delay());
        Ok(Self {
            from,
            to,
            rs,
            pending: Vec::new(),
            skip,
            taken: 0,
            given: 0,
        })
    }

    fn err(&self, e: impl std::fmt::Display) -> AudioError {
        AudioError::Resample {
            from: self.from,
            to: self.to,
            message: e.to_string(),
        }
    }

    fn emit(&mut self, mut out: Vec<f32>) -> Vec<f32> {
        let drop = self.skip.min(out.len());
        out.drain(..drop);
        self.skip -= drop;
        self.given += out.len() as u64;
        out
    }

    /// The next piece in; whatever output it completes out.
    pub fn push(&mut self, samples: &[f32]) -> Result<Vec<f32>, AudioError> {
        self.taken += samples.len() as u64;
        let Some(rs) = self.rs.as_mut() else {
            self.given += samples.len() as u64;
            return Ok(samples.to_vec());
        };
        self.pending.extend_from_slice(samples);
        let mut out = Vec::new();
        let mut used = 0;
        while self.pending.len() - used >= rs.input_frames_next() {
            let n = rs.input_frames_next();
            match rs.process(&[&self.pending[used..used + n]], None) {
                Ok(chunk) => out.extend_from_slice(&chunk[0]),
                Err(e) => {
                    let e = e.to_string();
                    return Err(self.err(e));
                }
            }
            used += n;
        }
        self.pending.drain(..used);
        Ok(self.emit(out))
    }

    /// The end of the audio: the rest of the output.
    pub fn finish(&mut self) -> Result<Vec<f32>, AudioError> {
        let want = (self.taken * u64::from(self.to) + u64::from(self.from) / 2) / u64::from(self.from);
        let Some(rs) = self.rs.as_mut() else {
            return Ok(Vec::new());
        };
        let pending = std::mem::take(&mut self.pending);
        let mut out = Vec::new();
        let mut first = true;
        // Feed the tail and then silence until the delayed output has all come out.
        while self.given + (out.len().saturating_sub(self.skip) as u64) < want {
            let chunk = if first {
                rs.process_partial(Some(&[&pending[..]]), None)
            } else {
                rs.process_partial::<&[f32]>(None, None)
            };
            first = false;
            match chunk {
                Ok(c) => out.extend_from_slice(&c[0]),
                Err(e) => {
                    let e = e.to_string();
                    return Err(self.err(e));
                }
            }
        }
        let mut out = self.emit(out);
        let excess = usize::try_from(self.given.saturating_sub(want)).unwrap_or(usize::MAX);
        out.truncate(out.len().saturating_sub(excess));
        self.given = want;
        Ok(out)
    }
}

/// Root mean square of `samples` (0 for none).
pub fn rms(samples: &[f32]) -> f32 {
    if samples.is_empty() {
        return 0.0;
    }
    (samples.iter().map(|s| s * s).sum::<f32>() / samples.len() as f32).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sine(rate: u32, hz: f32, secs: f32) -> Pcm {
        let n = (rate as f32 * secs) as usize;
        Pcm {
            rate,
            samples: (0..n)
                .map(|i| 0.5 * (std::f32::consts::TAU * hz * i as f32 / rate as f32).sin())
                .collect(),
        }
    }

    fn crossings(s: &[f32]) -> usize {
        s.windows(2).filter(|w| w[0] < 0.0 && w[1] >= 0.0).count()
    }

    #[test]
    fn resampling_keeps_length_pitch_level_and_alignment() {
        for (from, to) in [(22_050, 16_000), (22_050, 48_000), (24_000, 16_000), (24_000, 48_000)] {
            let input = sine(from, 440.0, 1.0);
            let out = resample(&input, to).expect("resample");
            assert_eq!(out.len(), to as usize, "{from}->{to}");
            // 440 Hz stays 440 Hz (±1 crossing), the level stays 0.5/√2, and the first
            // samples are not delayed (the resampler's delay is trimmed).
            let c = crossings(&out) as i64;
            assert!((c - 440).abs() <= 1, "{from}->{to}: {c} crossings");
            let level = rms(&out[to as usize / 10..to as usize * 9 / 10]);
            assert!((level - 0.3536).abs() < 0.01, "{from}->{to}: rms {level}");
            let expected = 0.5 * (std::f32::consts::TAU * 440.0 * 100.0 / to as f32).sin();
            assert!(
                (out[100] - expected).abs() < 0.05,
                "{from}->{to}: {} vs {expected}",
                out[100]
            );
        }
    }

    #[test]
    fn streaming_resampling_in_odd_pieces_matches_the_whole_sentence() {
        for (from, to) in [(22_050, 16_000), (8_000, 48_000), (48_000, 16_000), (16_000, 16_000)] {
            let input = sine(from, 440.0, 0.7);
            let whole = resample(&input, to).expect("whole");
            let mut rs = StreamResampler::new(from, to).expect("new");
            let mut out = Vec::new();
            for piece in input.samples.chunks(317) {
                out.extend(rs.push(piece).expect("push"));
            }
            out.extend(rs.finish().expect("finish"));
            assert_eq!(out.len(), whole.len(), "{from}->{to}");
            let worst = out.iter().zip(&whole).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(worst < 1e-3, "{from}->{to}: differs by {worst}");
        }
    }

    #[test]
    fn wav_with_a_streaming_placeholder_length_is_read_whole() {
        let mut bytes = Vec::new();
        {
            let spec = hound::WavSpec {
                channels: 2,
                sample_rate: 22_050,
                bits_per_sample: 16,
                sample_format: hound::SampleFormat::Int,
            };
            let mut w = hound::WavWriter::new(std::io::Cursor::new(&mut bytes), spec).expect("writer");
            for i in 0..1000i16 {
                w.write_sample(i).expect("l");
                w.write_sample(i).expect("r");
            }
            w.finalize().expect("finalize");
        }
        // What `espeak-ng --stdout` writes: sizes of 0x7FFFFFFF/0xFFFFFFFF it never fixes up.
        bytes[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        bytes[40..44].copy_from_slice(&u32::MAX.to_le_bytes());
        let pcm = decode_wav(&bytes).expect("decode");
        assert_eq!((pcm.rate, pcm.samples.len()), (22_050, 1000));
        assert!((pcm.samples[999] - 999.0 / 32768.0).abs() < 1e-6);
        assert!(decode_wav(b"not a wav file at all").is_err());
    }
}
