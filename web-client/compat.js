// @ts-check
/**
 * compat.js: one script tag that lets a page written for the old server (the test page in the
 * original design notes) play from avatar-edge without editing its code, and show its first
 * frame sooner:
 *
 * ```html
 * <script src="https://relay.example.com/compat.js"></script>
 * ```
 *
 * Put it in the page's `<head>`, before the page's own script. It does two things.
 *
 * 1. **The offer gets its media sections.** The old page calls `createOffer()` on a peer with no
 *    transceiver, so Chromium offers no media at all and no server can answer with video (the
 *    relay answers such an offer with the `offer_without_media` error). Before an offer from a
 *    peer with no transceiver and no data channel, this adds a receive-only video and a
 *    receive-only audio transceiver: the two lines docs/integration.md tells integrators to add.
 *    Any other peer (one that adds its own media, or a data-channel peer of some other script on
 *    the page) is left as it is.
 *
 * 2. **The browser's audio output is started while the page loads.** The first time a page plays
 *    a stream with sound, Chromium starts its audio output (on a browser that has played nothing
 *    yet, a separate audio process). That takes about 50 ms, during which the page's main thread
 *    waits, and it happens just as the first frame arrives: connect → first frame measured about
 *    140 ms instead of 50 (docs/integration.md). Creating an `AudioContext` here pays that cost at
 *    load, while the page waits for its user to click; it is closed at once, so nothing keeps
 *    running. Without a click, Chromium's console notes that it "was not allowed to start", which
 *    is expected.
 *
 * Keep `warmAudioOutput` in step with the SDK's (avatar-edge.js).
 */
(function avatarEdgeCompat() {
  const Peer = globalThis.RTCPeerConnection;
  const MARK = Symbol.for('avatar-edge.compat');
  const DATA = Symbol.for('avatar-edge.compat.data-channel');
  if (Peer && !Object.prototype.hasOwnProperty.call(Peer.prototype, MARK)) {
    Object.defineProperty(Peer.prototype, MARK, { value: true });
    const { createOffer, createDataChannel } = Peer.prototype;
    /** @this {any} */
    function createDataChannelMarked(/** @type {any[]} */ ...args) {
      Object.defineProperty(this, DATA, { value: true, configurable: true });
      return /** @type {any} */ (createDataChannel).apply(this, args);
    }
    /** @this {any} */
    function createOfferWithMedia(/** @type {any[]} */ ...args) {
      if (!this[DATA] && this.signalingState !== 'closed' && this.getTransceivers().length === 0) {
        try {
          this.addTransceiver('video', { direction: 'recvonly' });
          this.addTransceiver('audio', { direction: 'recvonly' });
        } catch {
          // The browser refused (a closing peer): createOffer below reports what is wrong.
        }
      }
      return /** @type {any} */ (createOffer).apply(this, args);
    }
    Peer.prototype.createDataChannel = /** @type {any} */ (createDataChannelMarked);
    Peer.prototype.createOffer = /** @type {any} */ (createOfferWithMedia);
  }
  warmAudioOutput();

  /** Start the audio output once per page: an `AudioContext` created and closed. */
  function warmAudioOutput() {
    const g = /** @type {any} */ (globalThis);
    const Context = g.AudioContext || g.webkitAudioContext;
    if (!Context || g.avatarEdgeAudioWarmed) return;
    g.avatarEdgeAudioWarmed = true;
    try {
      new Context().close().catch(() => {});
    } catch {
      // No audio output (a machine without sound devices): nothing to start early.
    }
  }
})();
