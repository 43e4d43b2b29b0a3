// A small, tolerant JSON reader and writer for the realtime wire protocol.
// Unity's JsonUtility cannot read our messages (maps keyed by output name, `shape: [null]`,
// NaN sent as null, messages told apart by `type`), so the package carries its own. Numbers are
// read and written with the invariant culture; integers are written without a fraction (the
// server refuses `1.0` as an id); NaN and infinities are written as null.
using System;
using System.Collections.Generic;
using System.Globalization;
using System.Text;

namespace Realtime
{
    /// <summary>The kind of a JSON value.</summary>
    public enum JsonKind { Null, Bool, Number, String, Array, Object }

    /// <summary>One parsed JSON value: read it with the typed accessors, which never throw on a
    /// missing key (they return the default given).</summary>
    public sealed class JsonValue
    {
        public static readonly JsonValue Null = new JsonValue(JsonKind.Null);

        public readonly JsonKind Kind;
        readonly double _number;
        readonly bool _bool;
        readonly string _string;
        readonly List<JsonValue> _items;
        readonly List<KeyValuePair<string, JsonValue>> _members;

        JsonValue(JsonKind kind) { Kind = kind; }
        JsonValue(double n) { Kind = JsonKind.Number; _number = n; }
        JsonValue(bool b) { Kind = JsonKind.Bool; _bool = b; }
        JsonValue(string s) { Kind = JsonKind.String; _string = s; }
        JsonValue(List<JsonValue> items) { Kind = JsonKind.Array; _items = items; }
        JsonValue(List<KeyValuePair<string, JsonValue>> members) { Kind = JsonKind.Object; _members = members; }

        internal static JsonValue Of(double n) { return new JsonValue(n); }
        internal static JsonValue Of(bool b) { return new JsonValue(b); }
        internal static JsonValue Of(string s) { return new JsonValue(s); }
        internal static JsonValue Of(List<JsonValue> items) { return new JsonValue(items); }
        internal static JsonValue Of(List<KeyValuePair<string, JsonValue>> members) { return new JsonValue(members); }

        public bool IsNull { get { return Kind == JsonKind.Null; } }
        public bool IsNumber { get { return Kind == JsonKind.Number; } }
        public bool IsString { get { return Kind == JsonKind.String; } }
        public bool IsObject { get { return Kind == JsonKind.Object; } }
        public bool IsArray { get { return Kind == JsonKind.Array; } }

        /// <summary>Items of an array (0 for anything else).</summary>
        public int Count { get { return _items != null ? _items.Count : _members != null ? _members.Count : 0; } }

        /// <summary>Item <paramref name="i"/> of an array (Null past its end or if not an array).</summary>
        public JsonValue this[int i] { get { return _items != null && i >= 0 && i < _items.Count ? _items[i] : Null; } }

        /// <summary>Member <paramref name="key"/> of an object (Null if absent or not an object).</summary>
        public JsonValue this[string key]
        {
            get
            {
                if (_members == null) return Null;
                for (int i = 0; i < _members.Count; i++)
                    if (_members[i].Key == key) return _members[i].Value;
                return Null;
            }
        }

        /// <summary>Whether an object has the member (even if it is null).</summary>
        public bool Has(string key)
        {
            if (_members == null) return false;
            for (int i = 0; i < _members.Count; i++) if (_members[i].Key == key) return true;
            return false;
        }

        /// <summary>An object's members, in document order.</summary>
        public IList<KeyValuePair<string, JsonValue>> Members
        {
            get { return _members ?? (IList<KeyValuePair<string, JsonValue>>)new KeyValuePair<string, JsonValue>[0]; }
        }

        /// <summary>An array's items.</summary>
        public IList<JsonValue> Items { get { return _items ?? (IList<JsonValue>)new JsonValue[0]; } }

        /// <summary>The number; JSON null reads as NaN (the protocol sends NaN as null).</summary>
        public double AsDouble(double fallback = double.NaN)
        {
            return Kind == JsonKind.Number ? _number : Kind == JsonKind.Null ? double.NaN : fallback;
        }

        /// <summary>The number as a long (truncated), or the fallback.</summary>
        public long AsLong(long fallback = 0) { return Kind == JsonKind.Number ? (long)_number : fallback; }
        /// <summary>The number as an int (truncated), or the fallback.</summary>
        public int AsInt(int fallback = 0) { return Kind == JsonKind.Number ? (int)_number : fallback; }
        /// <summary>The boolean, or the fallback.</summary>
        public bool AsBool(bool fallback = false) { return Kind == JsonKind.Bool ? _bool : fallback; }
        /// <summary>The string, or the fallback.</summary>
        public string AsString(string fallback = null) { return Kind == JsonKind.String ? _string : fallback; }

        /// <summary>Parse one JSON document; throws FormatException on malformed text.</summary>
        public static JsonValue Parse(string text) { return new JsonReader(text).ReadDocument(); }

        /// <summary>The value written back as compact JSON.</summary>
        public override string ToString()
        {
            var w = new JsonWriter();
            w.Value(this);
            return w.ToString();
        }
    }

    /// <summary>A recursive-descent JSON parser (RFC 8259, plus NaN/Infinity tokens read as numbers).</summary>
    internal struct JsonReader
    {
        const int MaxDepth = 64;
        readonly string _s;
        int _i;

        public JsonReader(string s) { _s = s ?? ""; _i = 0; }

        public JsonValue ReadDocument()
        {
            var v = ReadValue(0);
            SkipSpace();
            if (_i != _s.Length) throw Fail("trailing characters");
            return v;
        }

        FormatException Fail(string what)
        {
            return new FormatException("invalid JSON at " + _i.ToString(CultureInfo.InvariantCulture) + ": " + what);
        }

        void SkipSpace()
        {
            while (_i < _s.Length)
            {
                char c = _s[_i];
                if (c == ' ' || c == '\t' || c == '\n' || c == '\r') _i++;
                else break;
            }
        }

        bool Literal(string word)
        {
            if (string.CompareOrdinal(_s, _i, word, 0, word.Length) != 0) return false;
            _i += word.Length;
            return true;
        }

        JsonValue ReadValue(int depth)
        {
            if (depth > MaxDepth) throw Fail("nested too deep");
            SkipSpace();
            if (_i >= _s.Length) throw Fail("unexpected end");
            char c = _s[_i];
            switch (c)
            {
                case '{': return ReadObject(depth);
                case '[': return ReadArray(depth);
                case '"': return JsonValue.Of(ReadString());
                case 't': if (Literal("true")) return JsonValue.Of(true); break;
                case 'f': if (Literal("false")) return JsonValue.Of(false); break;
                case 'n': if (Literal("null")) return JsonValue.Null; break;
                case 'N': if (Literal("NaN")) return JsonValue.Of(double.NaN); break;
                case 'I': if (Literal("Infinity")) return JsonValue.Of(double.PositiveInfinity); break;
                default:
                    if (c == '-' || (c >= '0' && c <= '9')) return ReadNumber();
                    break;
            }
            throw Fail("unexpected character '" + c + "'");
        }

        JsonValue ReadNumber()
        {
            int start = _i;
            if (_s[_i] == '-')
            {
                _i++;
                if (Literal("Infinity")) return JsonValue.Of(double.NegativeInfinity);
            }
            while (_i < _s.Length)
            {
                char c = _s[_i];
                if ((c >= '0' && c <= '9') || c == '.' || c == 'e' || c == 'E' || c == '+' || c == '-') _i++;
                else break;
            }
            // Fast path for plain integers (ids, seqs, counts): no substring, no culture.
            long n = 0;
            bool neg = _s[start] == '-';
            int k = neg ? start + 1 : start;
            bool integer = k < _i && _i - k <= 15;
            for (int j = k; integer && j < _i; j++)
            {
                char c = _s[j];
                if (c < '0' || c > '9') integer = false;
                else n = n * 10 + (c - '0');
            }
            if (integer) return JsonValue.Of(neg ? -(double)n : n);
            double d;
            if (!double.TryParse(_s.Substring(start, _i - start), NumberStyles.Float, CultureInfo.InvariantCulture, out d))
                throw Fail("bad number");
            return JsonValue.Of(d);
        }

        string ReadString()
        {
            _i++; // opening quote
            StringBuilder sb = null;
            int run = _i;
            while (true)
            {
                if (_i >= _s.Length) throw Fail("unterminated string");
                char c = _s[_i];
                if (c == '"')
                {
                    string tail = _s.Substring(run, _i - run);
                    _i++;
                    return sb == null ? tail : sb.Append(tail).ToString();
                }
                if (c != '\\') { _i++; continue; }
                if (sb == null) sb = new StringBuilder();
                sb.Append(_s, run, _i - run);
                _i++;
                if (_i >= _s.Length) throw Fail("unterminated escape");
                char e = _s[_i++];
                switch (e)
                {
                    case '"': sb.Append('"'); break;
                    case '\\': sb.Append('\\'); break;
                    case '/': sb.Append('/'); break;
                    case 'b': sb.Append('\b'); break;
                    case 'f': sb.Append('\f'); break;
                    case 'n': sb.Append('\n'); break;
                    case 'r': sb.Append('\r'); break;
                    case 't': sb.Append('\t'); break;
                    case 'u':
                        if (_i + 4 > _s.Length) throw Fail("short \\u escape");
                        int code;
                        if (!int.TryParse(_s.Substring(_i, 4), NumberStyles.AllowHexSpecifier, CultureInfo.InvariantCulture, out code))
                            throw Fail("bad \\u escape");
                        sb.Append((char)code);
                        _i += 4;
                        break;
                    default: throw Fail("bad escape");
                }
                run = _i;
            }
        }

        JsonValue ReadArray(int depth)
        {
            _i++;
            var items = new List<JsonValue>();
            SkipSpace();
            if (_i < _s.Length && _s[_i] == ']') { _i++; return JsonValue.Of(items); }
            while (true)
            {
                items.Add(ReadValue(depth + 1));
                SkipSpace();
                if (_i >= _s.Length) throw Fail("unterminated array");
                char c = _s[_i++];
                if (c == ']') return JsonValue.Of(items);
                if (c != ',') throw Fail("expected , or ]");
            }
        }

        JsonValue ReadObject(int depth)
        {
            _i++;
            var members = new List<KeyValuePair<string, JsonValue>>();
            SkipSpace();
            if (_i < _s.Length && _s[_i] == '}') { _i++; return JsonValue.Of(members); }
            while (true)
            {
                SkipSpace();
                if (_i >= _s.Length || _s[_i] != '"') throw Fail("expected a key");
                string key = ReadString();
                SkipSpace();
                if (_i >= _s.Length || _s[_i] != ':') throw Fail("expected :");
                _i++;
                members.Add(new KeyValuePair<string, JsonValue>(key, ReadValue(depth + 1)));
                SkipSpace();
                if (_i >= _s.Length) throw Fail("unterminated object");
                char c = _s[_i++];
                if (c == '}') return JsonValue.Of(members);
                if (c != ',') throw Fail("expected , or }");
            }
        }
    }

    /// <summary>Writes compact JSON: integers without a fraction, doubles in the invariant culture
    /// (round-trip precision), NaN and infinities as null.</summary>
    public sealed class JsonWriter
    {
        readonly StringBuilder _sb = new StringBuilder(128);
        bool _needComma;

        /// <summary>Start an object; write members with <see cref="Key"/> then a value.</summary>
        public JsonWriter BeginObject() { Separate(); _sb.Append('{'); _needComma = false; return this; }
        public JsonWriter EndObject() { _sb.Append('}'); _needComma = true; return this; }
        /// <summary>Start an array.</summary>
        public JsonWriter BeginArray() { Separate(); _sb.Append('['); _needComma = false; return this; }
        public JsonWriter EndArray() { _sb.Append(']'); _needComma = true; return this; }

        /// <summary>Write a member key; the next value written is its value.</summary>
        public JsonWriter Key(string key)
        {
            Separate();
            WriteString(key);
            _sb.Append(':');
            _needComma = false;
            return this;
        }

        /// <summary>An integer, written without a fraction (ids, seqs, counts).</summary>
        public JsonWriter Value(long n) { Separate(); _sb.Append(n.ToString(CultureInfo.InvariantCulture)); _needComma = true; return this; }

        /// <summary>A number in the invariant culture, round-trip precision; NaN and infinities as null.</summary>
        public JsonWriter Value(double d)
        {
            Separate();
            if (double.IsNaN(d) || double.IsInfinity(d)) _sb.Append("null");
            else _sb.Append(d.ToString("R", CultureInfo.InvariantCulture));
            _needComma = true;
            return this;
        }

        /// <summary>true or false.</summary>
        public JsonWriter Value(bool b) { Separate(); _sb.Append(b ? "true" : "false"); _needComma = true; return this; }

        /// <summary>A string, escaped (null as null).</summary>
        public JsonWriter Value(string s)
        {
            Separate();
            if (s == null) _sb.Append("null");
            else WriteString(s);
            _needComma = true;
            return this;
        }

        /// <summary>null.</summary>
        public JsonWriter Null() { Separate(); _sb.Append("null"); _needComma = true; return this; }

        /// <summary>Write a parsed value back (integral numbers without a fraction).</summary>
        public JsonWriter Value(JsonValue v)
        {
            switch (v.Kind)
            {
                case JsonKind.Null: return Null();
                case JsonKind.Bool: return Value(v.AsBool());
                case JsonKind.String: return Value(v.AsString());
                case JsonKind.Number:
                    double d = v.AsDouble();
                    if (Math.Abs(d) < 9007199254740992.0 && d == Math.Floor(d)) return Value((long)d);
                    return Value(d);
                case JsonKind.Array:
                    BeginArray();
                    foreach (var item in v.Items) Value(item);
                    return EndArray();
                default:
                    BeginObject();
                    foreach (var m in v.Members) { Key(m.Key); Value(m.Value); }
                    return EndObject();
            }
        }

        /// <summary>Write a dictionary of simple values (string, bool, integral or floating numbers,
        /// nested dictionaries, lists, JsonValue).</summary>
        public JsonWriter Value(object o)
        {
            if (o == null) return Null();
            if (o is string) return Value((string)o);
            if (o is bool) return Value((bool)o);
            if (o is int) return Value((long)(int)o);
            if (o is long) return Value((long)o);
            if (o is uint) return Value((long)(uint)o);
            if (o is float) return Value((double)(float)o);
            if (o is double) return Value((double)o);
            if (o is JsonValue) return Value((JsonValue)o);
            var dict = o as IDictionary<string, object>;
            if (dict != null)
            {
                BeginObject();
                foreach (var kv in dict) { Key(kv.Key); Value(kv.Value); }
                return EndObject();
            }
            var list = o as System.Collections.IEnumerable;
            if (list != null)
            {
                BeginArray();
                foreach (var item in list) Value(item);
                return EndArray();
            }
            throw new ArgumentException("cannot write " + o.GetType().Name + " as JSON");
        }

        void Separate() { if (_needComma) _sb.Append(','); }

        void WriteString(string s)
        {
            _sb.Append('"');
            for (int i = 0; i < s.Length; i++)
            {
                char c = s[i];
                switch (c)
                {
                    case '"': _sb.Append("\\\""); break;
                    case '\\': _sb.Append("\\\\"); break;
                    case '\n': _sb.Append("\\n"); break;
                    case '\r': _sb.Append("\\r"); break;
                    case '\t': _sb.Append("\\t"); break;
                    default:
                        if (c < 0x20) _sb.Append("\\u").Append(((int)c).ToString("x4", CultureInfo.InvariantCulture));
                        else _sb.Append(c);
                        break;
                }
            }
            _sb.Append('"');
        }

        public override string ToString() { return _sb.ToString(); }
    }
}
