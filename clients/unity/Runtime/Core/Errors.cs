// Typed errors: every documented wire code (docs/protocol.md#error-codes) as an enum value.
using System;
using System.Collections.Generic;

namespace Realtime
{
    /// <summary>The stable error codes of the wire protocol. Branch on these, not on messages.
    /// <see cref="Unknown"/> stands for a code this client does not know (a newer server).</summary>
    public enum ErrorCode
    {
        Unknown = 0,
        BadMessage,
        BadFrame,
        MessageTooBig,
        UnsupportedVersion,
        HelloRequired,
        StreamNotOpen,
        StreamAlreadyOpen,
        TooManyStreams,
        UnknownModel,
        ModelForbidden,
        UnknownVersion,
        KindMismatch,
        DtypeMismatch,
        ShapeMismatch,
        UnsupportedSampleRate,
        NonFiniteInput,
        BadSequence,
        Overloaded,
        DeadlineExceeded,
        ResultsDropped,
        Dropped,
        InferenceFailed,
        GoingAway,
        RateLimited,
        InternalError,
        ResumeUnknown,
        ResumeExpired,
        ServerBusy,
    }

    /// <summary>Conversion between <see cref="ErrorCode"/> and its snake_case wire form.</summary>
    public static class ErrorCodes
    {
        static readonly Dictionary<string, ErrorCode> ByWire = new Dictionary<string, ErrorCode>();
        static readonly Dictionary<ErrorCode, string> ToWireName = new Dictionary<ErrorCode, string>();

        static ErrorCodes()
        {
            foreach (ErrorCode code in Enum.GetValues(typeof(ErrorCode)))
            {
                if (code == ErrorCode.Unknown) continue;
                string name = code.ToString();
                var sb = new System.Text.StringBuilder();
                for (int i = 0; i < name.Length; i++)
                {
                    if (char.IsUpper(name[i]) && i > 0) sb.Append('_');
                    sb.Append(char.ToLowerInvariant(name[i]));
                }
                ByWire[sb.ToString()] = code;
                ToWireName[code] = sb.ToString();
            }
        }

        /// <summary>The enum value of a wire code (<see cref="ErrorCode.Unknown"/> if new to us).</summary>
        public static ErrorCode Parse(string wire)
        {
            ErrorCode code;
            return wire != null && ByWire.TryGetValue(wire, out code) ? code : ErrorCode.Unknown;
        }

        /// <summary>The wire form of a code (snake_case), or null for Unknown.</summary>
        public static string ToWire(ErrorCode code)
        {
            string s;
            return ToWireName.TryGetValue(code, out s) ? s : null;
        }

        /// <summary>Every code this client knows, in wire form.</summary>
        public static IEnumerable<string> All { get { return ToWireName.Values; } }
    }

    /// <summary>A typed error from the server (or about the connection). Chunk errors are
    /// delivered as values (in the stream's order); request errors (open, close, connect) are
    /// thrown from the awaited task.</summary>
    public class RealtimeException : Exception
    {
        /// <summary>The code as an enum; <see cref="ErrorCode.Unknown"/> if the server sent a new one.</summary>
        public readonly ErrorCode Code;
        /// <summary>The code as it came on the wire (snake_case).</summary>
        public readonly string WireCode;
        /// <summary>Whether sending the same thing again later can succeed.</summary>
        public readonly bool Retryable;
        /// <summary>The stream the error concerns, if any.</summary>
        public readonly long? Stream;
        /// <summary>The chunk the error concerns, if any.</summary>
        public readonly long? Seq;
        /// <summary>The message for people (the exception's Message is "code: message").</summary>
        public readonly string Detail;
        /// <summary>server_busy: how long to wait before trying again (ms), if the server said.</summary>
        public double? RetryAfterMs;

        public RealtimeException(string wireCode, string message, bool retryable = false, long? stream = null, long? seq = null)
            : base(wireCode + ": " + message)
        {
            WireCode = wireCode;
            Code = ErrorCodes.Parse(wireCode);
            Detail = message;
            Retryable = retryable;
            Stream = stream;
            Seq = seq;
        }

        public RealtimeException(ErrorCode code, string message, bool retryable = false, long? stream = null, long? seq = null)
            : this(ErrorCodes.ToWire(code) ?? "unknown", message, retryable, stream, seq) { }

        internal static RealtimeException FromMessage(JsonValue m)
        {
            var e = new RealtimeException(
                m["code"].AsString("internal_error"), m["message"].AsString(""), m["retryable"].AsBool(),
                m["stream"].IsNumber ? m["stream"].AsLong() : (long?)null,
                m["seq"].IsNumber ? m["seq"].AsLong() : (long?)null);
            if (m["retry_after_ms"].IsNumber) e.RetryAfterMs = m["retry_after_ms"].AsDouble();
            return e;
        }
    }

    /// <summary>The connection ended and the session could not be kept or resumed.</summary>
    public class RealtimeDisconnectedException : Exception
    {
        /// <summary>The WebSocket close code (1006 when the connection dropped without one).</summary>
        public readonly int CloseCode;
        /// <summary>A typed error that explains it when there is one (resume_expired, resume_unknown).</summary>
        public readonly RealtimeException Cause;

        public RealtimeDisconnectedException(string message, int closeCode, RealtimeException cause = null)
            : base(message, cause)
        {
            CloseCode = closeCode;
            Cause = cause;
        }
    }
}
