// Unity audio (float, interleaved, any channel count, any rate: 48 kHz stereo is typical) to a
// stream's chunks: downmixed to mono, resampled to the model's rate, cut into chunks and
// timestamped by the samples sent. Pure C#: no UnityEngine, no allocation per block.
using System;

namespace Realtime
{
    /// <summary>A streaming windowed-sinc (Kaiser) resampler of mono float audio, any ratio.
    /// Zero phase: output sample k is the input at time k / outputRate (no delay in the timeline);
    /// it waits for <see cref="Latency"/> input samples of look-ahead.</summary>
    public sealed class StreamingResampler
    {
        const int Resolution = 256;  // kernel table points per input sample
        readonly double _step;       // input samples per output sample
        readonly int _halfWidth;     // input samples each side of an output sample
        readonly float[] _kernel;    // kernel(x) at x = i / Resolution, i in [0, halfWidth * Resolution]
        float[] _in = new float[4096];
        int _inCount;                // samples held in _in
        long _inBase;                // absolute index of _in[0]
        long _outIndex;              // next output sample to produce

        public readonly int InputRate;
        public readonly int OutputRate;

        public StreamingResampler(int inputRate, int outputRate, int zeroCrossings = 16)
        {
            if (inputRate <= 0 || outputRate <= 0) throw new ArgumentException("rates must be positive");
            InputRate = inputRate;
            OutputRate = outputRate;
            _step = (double)inputRate / outputRate;
            // Cut off at 90% of the lower Nyquist: cycles per input sample.
            double fc = 0.5 * Math.Min(1.0, (double)outputRate / inputRate) * 0.9;
            _halfWidth = (int)Math.Ceiling(zeroCrossings / (2 * fc));
            _kernel = new float[_halfWidth * Resolution + 2];
            const double beta = 8.6;
            double i0Beta = BesselI0(beta);
            for (int i = 0; i < _kernel.Length; i++)
            {
                double x = (double)i / Resolution;
                double r = x / _halfWidth;
                double window = r >= 1 ? 0 : BesselI0(beta * Math.Sqrt(1 - r * r)) / i0Beta;
                double arg = 2 * fc * x;
                double sinc = arg == 0 ? 1 : Math.Sin(Math.PI * arg) / (Math.PI * arg);
                _kernel[i] = (float)(2 * fc * sinc * window);
            }
            // Pre-roll: the signal is zero before its first sample.
            _inBase = -_halfWidth;
            _inCount = _halfWidth;
        }

        /// <summary>Input samples of look-ahead an output sample waits for.</summary>
        public int Latency { get { return _halfWidth; } }

        static double BesselI0(double x)
        {
            double sum = 1, term = 1, q = x * x / 4;
            for (int k = 1; k < 50; k++)
            {
                term *= q / (k * k);
                sum += term;
                if (term < 1e-12 * sum) break;
            }
            return sum;
        }

        /// <summary>Append input samples.</summary>
        public void Push(float sample)
        {
            if (_inCount == _in.Length) Compact();
            _in[_inCount++] = sample;
        }

        void Compact()
        {
            // Drop what no future output needs; grow only if everything is still needed.
            long needed = (long)Math.Floor(_outIndex * _step) - _halfWidth - 1;
            int drop = (int)Math.Max(0, Math.Min(_inCount, needed - _inBase));
            if (drop > 0)
            {
                Array.Copy(_in, drop, _in, 0, _inCount - drop);
                _inCount -= drop;
                _inBase += drop;
            }
            if (_inCount == _in.Length) Array.Resize(ref _in, 2 * _in.Length);
        }

        /// <summary>Write the output samples that are ready into <paramref name="output"/> from
        /// <paramref name="offset"/>; returns how many (at most <paramref name="room"/>).</summary>
        public int Pull(float[] output, int offset, int room)
        {
            int n = 0;
            long available = _inBase + _inCount;  // absolute end of input
            while (n < room)
            {
                double centre = _outIndex * _step;
                if ((long)Math.Floor(centre) + _halfWidth + 1 >= available) break;
                output[offset + n++] = Sample(centre);
                _outIndex++;
            }
            return n;
        }

        /// <summary>End of the audio: pad with zeros so every output sample up to the input's
        /// end comes out (call <see cref="Pull"/> after).</summary>
        public void Flush()
        {
            long end = _inBase + _inCount;
            long lastOut = (long)Math.Ceiling(end / _step);
            long needed = (long)Math.Floor(lastOut * _step) + _halfWidth + 2;
            while (_inBase + _inCount < needed) Push(0f);
        }

        float Sample(double centre)
        {
            long first = (long)Math.Floor(centre) - _halfWidth + 1;
            double acc = 0;
            for (long j = first; j <= first + 2 * _halfWidth - 1; j++)
            {
                double x = Math.Abs(j - centre) * Resolution;
                int i = (int)x;
                if (i + 1 >= _kernel.Length) continue;
                double frac = x - i;
                double k = _kernel[i] + (_kernel[i + 1] - _kernel[i]) * frac;
                acc += k * _in[j - _inBase];
            }
            return (float)acc;  // the kernel sums to 1 over unit-spaced samples: unity gain at DC
        }
    }

    /// <summary>Sends Unity audio to an audio stream: downmix, resample to the stream's rate, cut
    /// into chunks of <c>chunkSamples</c> (0: one chunk per block written) and timestamp each
    /// chunk with the time of its first sample (<c>startMs</c> + samples sent / rate).</summary>
    public sealed class AudioSender
    {
        readonly RealtimeStream _stream;
        readonly int _channels;
        readonly StreamingResampler _resampler;  // null when the rates match
        readonly int _chunkSamples;
        float[] _chunk;
        int _filled;
        long _sent;

        /// <summary>Samples per second of the chunks sent (the rate to open the stream with).</summary>
        public readonly int OutputRate;
        /// <summary>The timeline time (ms) of the first sample.</summary>
        public double StartMs;

        public AudioSender(RealtimeStream stream, int inputRate, int channels, int outputRate, int chunkSamples = 0)
        {
            if (channels < 1) throw new ArgumentException("channels must be at least 1");
            _stream = stream;
            _channels = channels;
            OutputRate = outputRate;
            _chunkSamples = chunkSamples;
            if (inputRate != outputRate) _resampler = new StreamingResampler(inputRate, outputRate);
            _chunk = new float[chunkSamples > 0 ? chunkSamples : 4096];
        }

        /// <summary>Samples sent so far (at the output rate).</summary>
        public long SamplesSent { get { return _sent; } }

        /// <summary>Write <paramref name="frames"/> interleaved frames (as OnAudioFilterRead or
        /// AudioClip.GetData give them) and send the chunks they complete.</summary>
        public void Write(float[] interleaved, int offset, int frames)
        {
            for (int f = 0; f < frames; f++)
            {
                int o = offset + f * _channels;
                float sum = 0;
                for (int c = 0; c < _channels; c++) sum += interleaved[o + c];
                float mono = sum / _channels;
                if (_resampler != null) _resampler.Push(mono);
                else Add(mono);
            }
            if (_resampler != null) Drain();
            if (_chunkSamples == 0) SendChunk(false);
        }

        /// <summary>Send what is left (the resampler's tail too); with <paramref name="endOfSegment"/>
        /// the last chunk carries the end-of-segment flag (the server closes the utterance now).</summary>
        public void Flush(bool endOfSegment = false)
        {
            if (_resampler != null)
            {
                _resampler.Flush();
                Drain();
            }
            if (_filled > 0 || endOfSegment) SendChunk(endOfSegment);
        }

        void Drain()
        {
            while (true)
            {
                if (_filled == _chunk.Length)
                {
                    if (_chunkSamples > 0) SendChunk(false);
                    else Array.Resize(ref _chunk, 2 * _chunk.Length);
                }
                int n = _resampler.Pull(_chunk, _filled, _chunk.Length - _filled);
                if (n == 0) return;
                _filled += n;
            }
        }

        void Add(float sample)
        {
            if (_filled == _chunk.Length)
            {
                if (_chunkSamples > 0) SendChunk(false);
                else Array.Resize(ref _chunk, 2 * _chunk.Length);
            }
            _chunk[_filled++] = sample;
        }

        void SendChunk(bool endOfSegment)
        {
            if (_filled == 0 && !endOfSegment) return;
            double t = StartMs + 1000.0 * _sent / OutputRate;
            _stream.Send(_chunk, 0, _filled, t, null, endOfSegment);
            _sent += _filled;
            _filled = 0;
        }
    }

    /// <summary>Paces work against a Stopwatch schedule (Task.Delay and Thread.Sleep are too coarse
    /// for 20 ms chunks): sleeps while more than 2 ms remain, then spins.</summary>
    public sealed class Pacer
    {
        readonly System.Diagnostics.Stopwatch _watch = System.Diagnostics.Stopwatch.StartNew();

        /// <summary>Milliseconds since the pacer started.</summary>
        public double ElapsedMs { get { return _watch.Elapsed.TotalMilliseconds; } }

        /// <summary>Block until <paramref name="ms"/> after the start (at once if it has passed).</summary>
        public void WaitUntil(double ms)
        {
            while (true)
            {
                double left = ms - ElapsedMs;
                if (left <= 0) return;
                if (left > 2) System.Threading.Thread.Sleep((int)(left - 1.5));
                else System.Threading.Thread.SpinWait(200);
            }
        }
    }
}
