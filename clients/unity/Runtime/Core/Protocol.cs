// Wire protocol v1 (docs/protocol.md): the 32-byte binary header, dtypes and typed messages.
using System;
using System.Collections.Generic;

namespace Realtime
{
    /// <summary>Wire dtype codes (docs/protocol.md#dtypes). Stable: a code never changes.</summary>
    public enum DType : byte
    {
        Float32 = 1, Float16 = 2, Float64 = 3, Int8 = 4, UInt8 = 5,
        Int16 = 6, UInt16 = 7, Int32 = 8, Int64 = 9, Bool = 10,
    }

    /// <summary>What a stream carries; must be its model's kind.</summary>
    public enum StreamKind { Audio, Video, Tensor }

    /// <summary>How results come back: JSON text frames or binary frames (exact floats, NaN kept).</summary>
    public enum ResultMode { Json, Binary }

    /// <summary>What a stream does when it is sent more than it is served (docs/protocol.md#backpressure-and-deadlines).</summary>
    public enum Overflow { Default, DropOldest, Reject }

    /// <summary>Constants and codecs of the wire protocol.</summary>
    public static class Wire
    {
        public const int ProtocolVersion = 1;
        public const int HeaderSize = 32;
        public const int MaxDims = 8;
        public const byte FrameChunk = 1;
        public const byte FrameResult = 2;
        /// <summary>Chunk flag bit 0: this chunk ends a segment (an utterance, a phrase).</summary>
        public const ushort FlagEndOfSegment = 1;

        /// <summary>Bytes per value of a dtype.</summary>
        public static int ItemSize(DType d)
        {
            switch (d)
            {
                case DType.Float64: case DType.Int64: return 8;
                case DType.Float32: case DType.Int32: return 4;
                case DType.Float16: case DType.Int16: case DType.UInt16: return 2;
                default: return 1;
            }
        }

        /// <summary>The wire name of a dtype ("float32", ...).</summary>
        public static string Name(DType d)
        {
            switch (d)
            {
                case DType.Float32: return "float32";
                case DType.Float16: return "float16";
                case DType.Float64: return "float64";
                case DType.Int8: return "int8";
                case DType.UInt8: return "uint8";
                case DType.Int16: return "int16";
                case DType.UInt16: return "uint16";
                case DType.Int32: return "int32";
                case DType.Int64: return "int64";
                default: return "bool";
            }
        }

        /// <summary>The dtype of a wire name; false if the name is not one.</summary>
        public static bool TryParseDType(string name, out DType d)
        {
            for (byte code = 1; code <= 10; code++)
            {
                if (Name((DType)code) == name) { d = (DType)code; return true; }
            }
            d = DType.Float32;
            return false;
        }

        /// <summary>The wire name of a stream kind ("audio", "video", "tensor").</summary>
        public static string Name(StreamKind k) { return k == StreamKind.Audio ? "audio" : k == StreamKind.Video ? "video" : "tensor"; }

        /// <summary>Bytes taken by <paramref name="ndim"/> u32 dims, padded so the payload is 8-byte aligned.</summary>
        public static int DimsSize(int ndim) { return (4 * ndim + 7) & ~7; }

        /// <summary>The size of a whole chunk frame: header, dims, payload.</summary>
        public static int FrameSize(int ndim, int payloadBytes) { return HeaderSize + DimsSize(ndim) + payloadBytes; }

        /// <summary>Write a chunk header and its dims at the start of <paramref name="buf"/>;
        /// returns the payload's offset. Little-endian whatever the CPU.</summary>
        public static int WriteChunkHeader(byte[] buf, DType dtype, int[] shape, int ndim, uint stream, uint seq,
                                           double t, ushort flags, uint deadlineMs)
        {
            if (ndim > MaxDims) throw new ArgumentException(ndim + " dims, at most " + MaxDims);
            buf[0] = ProtocolVersion;
            buf[1] = FrameChunk;
            buf[2] = (byte)dtype;
            buf[3] = (byte)ndim;
            PutU32(buf, 4, stream);
            PutU32(buf, 8, seq);
            buf[12] = (byte)flags;
            buf[13] = (byte)(flags >> 8);
            buf[14] = 0;
            buf[15] = 0;
            PutU64(buf, 16, (ulong)BitConverter.DoubleToInt64Bits(t));
            PutU32(buf, 24, deadlineMs);
            PutU32(buf, 28, 0);
            int offset = HeaderSize;
            for (int i = 0; i < ndim; i++, offset += 4) PutU32(buf, offset, (uint)shape[i]);
            int end = HeaderSize + DimsSize(ndim);
            for (; offset < end; offset++) buf[offset] = 0;
            return end;
        }

        internal static void PutU32(byte[] b, int o, uint v)
        {
            b[o] = (byte)v; b[o + 1] = (byte)(v >> 8); b[o + 2] = (byte)(v >> 16); b[o + 3] = (byte)(v >> 24);
        }

        static void PutU64(byte[] b, int o, ulong v)
        {
            PutU32(b, o, (uint)v);
            PutU32(b, o + 4, (uint)(v >> 32));
        }

        internal static uint GetU32(byte[] b, int o)
        {
            return (uint)(b[o] | (b[o + 1] << 8) | (b[o + 2] << 16) | (b[o + 3] << 24));
        }

        static ulong GetU64(byte[] b, int o) { return GetU32(b, o) | ((ulong)GetU32(b, o + 4) << 32); }

        /// <summary>Parse one binary frame (a result from the server). Throws
        /// <see cref="RealtimeException"/> (bad_frame) on a malformed one.</summary>
        public static ResultFrame ParseFrame(byte[] b, int length)
        {
            if (length < HeaderSize) throw new RealtimeException(ErrorCode.BadFrame, "frame of " + length + " bytes is shorter than its header");
            if (b[0] != ProtocolVersion) throw new RealtimeException(ErrorCode.BadFrame, "frame version " + b[0]);
            var dtype = (DType)b[2];
            if (b[2] < 1 || b[2] > 10) throw new RealtimeException(ErrorCode.BadFrame, "unknown dtype code " + b[2]);
            int ndim = b[3];
            if (ndim > MaxDims) throw new RealtimeException(ErrorCode.BadFrame, ndim + " dims");
            int offset = HeaderSize + DimsSize(ndim);
            if (length < offset) throw new RealtimeException(ErrorCode.BadFrame, "frame ends inside its dims");
            var shape = new int[ndim];
            long count = 1;
            for (int i = 0; i < ndim; i++)
            {
                shape[i] = (int)GetU32(b, HeaderSize + 4 * i);
                count *= shape[i];
            }
            int item = ItemSize(dtype);
            if (length - offset != count * item)
                throw new RealtimeException(ErrorCode.BadFrame, "payload of " + (length - offset) + " bytes does not match its shape");
            var f = new ResultFrame();
            f.Type = b[1];
            f.Stream = GetU32(b, 4);
            f.Seq = GetU32(b, 8);
            f.Flags = (ushort)(b[12] | (b[13] << 8));
            f.Index = b[14];
            f.Count = b[15];
            f.T = BitConverter.Int64BitsToDouble((long)GetU64(b, 16));
            f.Extra0 = GetU32(b, 24);
            f.Extra1 = GetU32(b, 28);
            f.Tensor = new Tensor(dtype, shape, DecodeValues(b, offset, (int)count, dtype));
            return f;
        }

        static double[] DecodeValues(byte[] b, int offset, int count, DType dtype)
        {
            var values = new double[count];
            for (int i = 0; i < count; i++)
            {
                int o = offset + i * ItemSize(dtype);
                switch (dtype)
                {
                    case DType.Float32: values[i] = SingleBits.ToSingle(GetU32(b, o)); break;
                    case DType.Float64: values[i] = BitConverter.Int64BitsToDouble((long)GetU64(b, o)); break;
                    case DType.Float16: values[i] = HalfToDouble((ushort)(b[o] | (b[o + 1] << 8))); break;
                    case DType.Int8: values[i] = (sbyte)b[o]; break;
                    case DType.UInt8: case DType.Bool: values[i] = b[o]; break;
                    case DType.Int16: values[i] = (short)(b[o] | (b[o + 1] << 8)); break;
                    case DType.UInt16: values[i] = (ushort)(b[o] | (b[o + 1] << 8)); break;
                    case DType.Int32: values[i] = (int)GetU32(b, o); break;
                    case DType.Int64: values[i] = (long)GetU64(b, o); break;
                }
            }
            return values;
        }

        static double HalfToDouble(ushort h)
        {
            int sign = (h >> 15) != 0 ? -1 : 1;
            int exp = (h >> 10) & 0x1f;
            int frac = h & 0x3ff;
            if (exp == 0) return sign * frac * Math.Pow(2, -24);
            if (exp == 31) return frac == 0 ? sign * double.PositiveInfinity : double.NaN;
            return sign * (1 + frac / 1024.0) * Math.Pow(2, exp - 15);
        }
    }

    /// <summary>A float's bits without unsafe code or BitConverter.Int32BitsToSingle (absent
    /// from .NET Framework profiles).</summary>
    [System.Runtime.InteropServices.StructLayout(System.Runtime.InteropServices.LayoutKind.Explicit)]
    internal struct SingleBits
    {
        [System.Runtime.InteropServices.FieldOffset(0)] uint _bits;
        [System.Runtime.InteropServices.FieldOffset(0)] float _value;

        /// <summary>The float whose IEEE 754 bits these are.</summary>
        public static float ToSingle(uint bits)
        {
            var u = new SingleBits();
            u._bits = bits;
            return u._value;
        }
    }

    /// <summary>One binary frame from the server: one output of one chunk's result.</summary>
    public sealed class ResultFrame
    {
        public byte Type;
        public uint Stream;
        public uint Seq;
        public ushort Flags;
        public int Index;
        public int Count;
        public double T;
        /// <summary>Results: queue time in microseconds.</summary>
        public uint Extra0;
        /// <summary>Results: inference time in microseconds.</summary>
        public uint Extra1;
        public Tensor Tensor;
    }

    /// <summary>An array from a result: dtype, shape and values (C order) as doubles (NaN where
    /// the JSON said null).</summary>
    public sealed class Tensor
    {
        public readonly DType DType;
        public readonly int[] Shape;
        public readonly double[] Data;

        public Tensor(DType dtype, int[] shape, double[] data)
        {
            DType = dtype;
            Shape = shape;
            Data = data;
        }

        /// <summary>The value at a multi-dimensional index (C order).</summary>
        public double this[params int[] index]
        {
            get
            {
                int flat = 0;
                for (int i = 0; i < index.Length; i++) flat = flat * Shape[i] + index[i];
                return Data[flat];
            }
        }

        /// <summary>The values as floats, written into <paramref name="into"/> (no allocation if it is big enough).</summary>
        public float[] ToFloats(float[] into = null)
        {
            if (into == null || into.Length < Data.Length) into = new float[Data.Length];
            for (int i = 0; i < Data.Length; i++) into[i] = (float)Data[i];
            return into;
        }

        internal static Tensor FromJson(JsonValue v)
        {
            DType dtype;
            if (!Wire.TryParseDType(v["dtype"].AsString(), out dtype)) dtype = DType.Float64;
            var shapeJson = v["shape"];
            var shape = new int[shapeJson.Count];
            for (int i = 0; i < shape.Length; i++) shape[i] = shapeJson[i].AsInt();
            var dataJson = v["data"];
            var data = new double[dataJson.Count];
            for (int i = 0; i < data.Length; i++) data[i] = dataJson[i].AsDouble();  // null -> NaN
            return new Tensor(dtype, shape, data);
        }
    }

    /// <summary>The model outputs for one chunk, in stream order (docs/protocol.md#result).</summary>
    public sealed class Result
    {
        public uint Stream;
        public uint Seq;
        /// <summary>The chunk's own timestamp, echoed (ms, the client's timeline).</summary>
        public double T;
        /// <summary>Outputs by name, in the order of the stream's <c>opened.outputs</c>.</summary>
        public readonly Dictionary<string, Tensor> Outputs = new Dictionary<string, Tensor>();
        /// <summary>Audio streams: the time (ms) of each model window the chunk completed; else null.</summary>
        public double[] Windows;
        public double QueueMs;
        public double InferMs;
        /// <summary>How many chunks shared the model run (JSON results only; 0 in binary mode).</summary>
        public int Batch;
    }

    /// <summary>An event of a stream (speech_start, note_on, label, partial, final...).</summary>
    public sealed class RealtimeEvent
    {
        public uint Stream;
        /// <summary>The event type: "speech_start", "speech_end", "note_on", ...</summary>
        public string Name;
        /// <summary>When the thing happened, in the client's timeline (ms).</summary>
        public double T;
        /// <summary>The whole message, for the event's own fields (segment, prob, midi, label...).</summary>
        public JsonValue Fields;
    }

    /// <summary>The server's answer to an <c>open</c>: what the stream is bound to.</summary>
    public sealed class Opened
    {
        public uint Stream;
        public string Model;
        public string Version;
        public double DeadlineMs;
        public string Overflow;
        /// <summary>Output names, in the order of binary result frames.</summary>
        public string[] OutputNames;
        /// <summary>The whole message (input spec, outputs' dtypes and shapes).</summary>
        public JsonValue Message;
    }

    /// <summary>The server's <c>closed</c>: how many results and errors the stream got in all.</summary>
    public sealed class Closed
    {
        public uint Stream;
        public long Results;
        public long Errors;
    }

    /// <summary>Round trip and clock offset from a ping (docs/protocol.md#ping-client--server-and-pong-server--client).</summary>
    public struct PingResult
    {
        public double RoundTripMs;
        /// <summary>Server clock minus client clock, about (ms).</summary>
        public double ClockOffsetMs;
    }

    /// <summary>Everything a stream needs to open (docs/protocol.md#open-client--server).</summary>
    public sealed class OpenOptions
    {
        /// <summary>A model name from the catalog (required).</summary>
        public string Model;
        public string Version;
        /// <summary>Default: the catalog's kind for the model.</summary>
        public StreamKind? Kind;
        /// <summary>Default: the catalog's input dtype.</summary>
        public DType? DType;
        public int[] Shape;
        /// <summary>Audio: samples per second of what you send (the server resamples). Default: the model's.</summary>
        public int? SampleRate;
        public double? DeadlineMs;
        public ResultMode Results = ResultMode.Json;
        public Overflow Overflow = Overflow.Default;
        /// <summary>Post-processing options, e.g. { "partial_ms": 500 }.</summary>
        public Dictionary<string, object> Options;
        /// <summary>Stream id; default: the next free one.</summary>
        public uint? StreamId;
    }
}
