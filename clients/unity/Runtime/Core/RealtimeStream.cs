// One open stream of a RealtimeClient: send chunks, get results, events and errors in order.
using System;
using System.Collections.Generic;

namespace Realtime
{
    /// <summary>One stream bound to a model. <see cref="Send(float[], int, int, double, int[], bool, uint)"/>
    /// writes the chunk's frame into a pooled buffer (no garbage per chunk); each chunk gets exactly
    /// one <see cref="OnResult"/> or <see cref="OnError"/>, in sequence order, and events arrive
    /// after the result of the chunk that completed them. Callbacks run on the thread the client's
    /// <see cref="CallbackThread"/> says.</summary>
    public sealed class RealtimeStream
    {
        public readonly RealtimeClient Client;
        public readonly uint Id;
        /// <summary>The server's <c>opened</c> (model version, input spec, output names).</summary>
        public Opened Opened { get; internal set; }
        /// <summary>The dtype of the chunks this stream sends.</summary>
        public readonly DType DType;

        public event Action<Result> OnResult;
        public event Action<RealtimeEvent> OnEvent;
        /// <summary>A chunk's error (its Seq set), in its place in the order; or the stream's.</summary>
        public event Action<RealtimeException> OnError;
        public event Action<Closed> OnClosed;

        internal readonly string OpenText;
        internal uint NextSeq;
        /// <summary>Frames sent and not answered yet, by seq (kept to send again after a resume).</summary>
        internal readonly Dictionary<uint, PooledFrame> Unanswered = new Dictionary<uint, PooledFrame>(64);  // the server's default max_inflight_per_stream: no growth while streaming
        internal readonly Dictionary<uint, ResultFrame[]> Partial = new Dictionary<uint, ResultFrame[]>();
        readonly int[] _shape1 = new int[1];

        internal RealtimeStream(RealtimeClient client, uint id, DType dtype, string openText)
        {
            Client = client;
            Id = id;
            DType = dtype;
            OpenText = openText;
        }

        /// <summary>Chunks sent and not answered yet (a live sender may skip a frame while this is high).</summary>
        public int InFlight { get { lock (Client.Gate) return Unanswered.Count; } }

        /// <summary>Send float32 samples or values; returns the chunk's seq. <paramref name="t"/> is
        /// the chunk's time in your timeline (ms; audio: the time of its first sample).
        /// <paramref name="shape"/> defaults to [count].</summary>
        public uint Send(float[] data, int offset, int count, double t, int[] shape = null, bool endOfSegment = false, uint deadlineMs = 0)
        {
            return SendArray(Realtime.DType.Float32, data, offset, count, t, shape, endOfSegment, deadlineMs);
        }

        /// <summary>Send uint8 values (video frames [h, w, 3]).</summary>
        public uint Send(byte[] data, int offset, int count, double t, int[] shape = null, bool endOfSegment = false, uint deadlineMs = 0)
        {
            return SendArray(Realtime.DType.UInt8, data, offset, count, t, shape, endOfSegment, deadlineMs);
        }

        /// <summary>Send int16 PCM samples.</summary>
        public uint Send(short[] data, int offset, int count, double t, int[] shape = null, bool endOfSegment = false, uint deadlineMs = 0)
        {
            return SendArray(Realtime.DType.Int16, data, offset, count, t, shape, endOfSegment, deadlineMs);
        }

        /// <summary>Send int32 values.</summary>
        public uint Send(int[] data, int offset, int count, double t, int[] shape = null, bool endOfSegment = false, uint deadlineMs = 0)
        {
            return SendArray(Realtime.DType.Int32, data, offset, count, t, shape, endOfSegment, deadlineMs);
        }

        /// <summary>Send float64 values.</summary>
        public uint Send(double[] data, int offset, int count, double t, int[] shape = null, bool endOfSegment = false, uint deadlineMs = 0)
        {
            return SendArray(Realtime.DType.Float64, data, offset, count, t, shape, endOfSegment, deadlineMs);
        }

        /// <summary>Send int8 values.</summary>
        public uint Send(sbyte[] data, int offset, int count, double t, int[] shape = null, bool endOfSegment = false, uint deadlineMs = 0)
        {
            return SendArray(Realtime.DType.Int8, data, offset, count, t, shape, endOfSegment, deadlineMs);
        }

        /// <summary>Send uint16 values.</summary>
        public uint Send(ushort[] data, int offset, int count, double t, int[] shape = null, bool endOfSegment = false, uint deadlineMs = 0)
        {
            return SendArray(Realtime.DType.UInt16, data, offset, count, t, shape, endOfSegment, deadlineMs);
        }

        /// <summary>Send int64 values.</summary>
        public uint Send(long[] data, int offset, int count, double t, int[] shape = null, bool endOfSegment = false, uint deadlineMs = 0)
        {
            return SendArray(Realtime.DType.Int64, data, offset, count, t, shape, endOfSegment, deadlineMs);
        }

        /// <summary>Send booleans (one byte each).</summary>
        public uint Send(bool[] data, int offset, int count, double t, int[] shape = null, bool endOfSegment = false, uint deadlineMs = 0)
        {
            return SendArray(Realtime.DType.Bool, data, offset, count, t, shape, endOfSegment, deadlineMs);
        }

        /// <summary>Send raw little-endian bytes as <see cref="DType"/> values (float16, or any
        /// dtype already encoded): <paramref name="count"/> is in values, not bytes.</summary>
        public uint SendBytes(byte[] data, int byteOffset, int count, double t, int[] shape = null, bool endOfSegment = false, uint deadlineMs = 0)
        {
            return SendArray(DType, data, byteOffset, count, t, shape, endOfSegment, deadlineMs, true);
        }

        uint SendArray(DType dtype, Array data, int offset, int count, double t, int[] shape, bool endOfSegment, uint deadlineMs, bool raw = false)
        {
            if (dtype != DType)
                throw new RealtimeException(ErrorCode.DtypeMismatch, "stream " + Id + " sends " + Wire.Name(DType) + ", not " + Wire.Name(dtype), false, Id);
            int item = Wire.ItemSize(dtype);
            int srcItem = raw ? 1 : item;  // a raw byte source is indexed in bytes
            if (offset < 0 || count < 0 || (long)offset + (long)count * item / srcItem > data.Length) throw new ArgumentOutOfRangeException("count");
            if (double.IsNaN(t) || double.IsInfinity(t)) throw new ArgumentException("t must be finite");
            int ndim;
            if (shape == null)
            {
                _shape1[0] = count;
                shape = _shape1;
                ndim = 1;
            }
            else
            {
                ndim = shape.Length;
                long n = 1;
                for (int i = 0; i < ndim; i++) n *= shape[i];
                if (n != count) throw new ArgumentException("shape holds " + n + " items, count is " + count);
            }
            int size = Wire.FrameSize(ndim, count * item);
            byte[] buf = Client.Pool.Rent(size);
            uint seq;
            lock (Client.Gate)
            {
                seq = NextSeq++;
                int payload = Wire.WriteChunkHeader(buf, dtype, shape, ndim, Id, seq, t,
                                                    endOfSegment ? Wire.FlagEndOfSegment : (ushort)0, deadlineMs);
                Buffer.BlockCopy(data, offset * srcItem, buf, payload, count * item);  // little-endian, as every Unity target
                Client.SendChunk(this, seq, new PooledFrame(buf, size));
            }
            return seq;
        }

        /// <summary>Close the stream; completes with <c>closed</c> once every result of it arrived.</summary>
        public System.Threading.Tasks.Task<Closed> CloseAsync() { return Client.CloseStream(this); }

        internal void Deliver(Dispatcher.Kind kind, object payload)
        {
            switch (kind)
            {
                case Dispatcher.Kind.Result: { var h = OnResult; if (h != null) h((Result)payload); break; }
                case Dispatcher.Kind.Event: { var h = OnEvent; if (h != null) h((RealtimeEvent)payload); break; }
                case Dispatcher.Kind.Error: { var h = OnError; if (h != null) h((RealtimeException)payload); break; }
                case Dispatcher.Kind.Closed: { var h = OnClosed; if (h != null) h((Closed)payload); break; }
            }
        }
    }
}
