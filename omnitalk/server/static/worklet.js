// Microphone capture at the AudioContext's rate -> 24 kHz mono PCM16 chunks posted to the page.
// Downsampling: a 2-pole low-pass (cutoff 0.45 x 24 kHz) then linear interpolation; state carries over
// between render quanta, so chunk boundaries are seamless.
class Pcm16Capture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const o = (options && options.processorOptions) || {};
    this.target = o.targetRate || 24000;
    this.ratio = sampleRate / this.target;          // input samples per output sample
    this.chunk = Math.round(this.target * (o.chunkMs || 40) / 1000);
    this.buf = new Int16Array(this.chunk);
    this.n = 0;
    this.t = 0;            // position of the next output sample after `last`, in input samples
    this.last = 0;
    this.muted = false;
    this.peak = 0;
    // RBJ biquad low-pass, only when downsampling
    this.filter = sampleRate > this.target;
    if (this.filter) {
      const w = 2 * Math.PI * (0.45 * this.target) / sampleRate, q = Math.SQRT1_2;
      const a = Math.sin(w) / (2 * q), c = Math.cos(w), a0 = 1 + a;
      this.b0 = (1 - c) / 2 / a0; this.b1 = (1 - c) / a0; this.b2 = this.b0;
      this.a1 = -2 * c / a0; this.a2 = (1 - a) / a0;
      this.x1 = this.x2 = this.y1 = this.y2 = 0;
    }
    this.port.onmessage = (e) => { if (e.data && 'muted' in e.data) this.muted = !!e.data.muted; };
  }

  emit(v) {
    const s = Math.max(-1, Math.min(1, v));
    this.buf[this.n++] = s < 0 ? s * 32768 : s * 32767;
    if (this.n === this.chunk) {
      const out = this.buf;
      this.port.postMessage({ pcm: out.buffer, peak: this.peak }, [out.buffer]);
      this.buf = new Int16Array(this.chunk);
      this.n = 0;
      this.peak = 0;
    }
  }

  process(inputs) {
    const input = inputs[0];
    const ch = input && input[0];
    if (!ch) return true;
    for (let i = 0; i < ch.length; i++) {
      let x = this.muted ? 0 : ch[i];
      if (this.filter) {
        const y = this.b0 * x + this.b1 * this.x1 + this.b2 * this.x2 - this.a1 * this.y1 - this.a2 * this.y2;
        this.x2 = this.x1; this.x1 = x; this.y2 = this.y1; this.y1 = y; x = y;
      }
      const ax = Math.abs(x);
      if (ax > this.peak) this.peak = ax;
      while (this.t <= 1) {              // output samples that fall between `last` and `x`
        this.emit(this.last + (x - this.last) * this.t);
        this.t += this.ratio;
      }
      this.t -= 1;
      this.last = x;
    }
    return true;
  }
}

registerProcessor('pcm16-capture', Pcm16Capture);
