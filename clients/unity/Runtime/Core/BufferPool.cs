// Pooled byte buffers for chunk frames: a steady stream of chunks allocates nothing.
using System.Collections.Generic;

namespace Realtime
{
    /// <summary>A frame in a pooled buffer: the bytes are <c>Buffer[0..Length)</c>.</summary>
    public struct PooledFrame
    {
        public byte[] Buffer;
        public int Length;

        public PooledFrame(byte[] buffer, int length) { Buffer = buffer; Length = length; }
    }

    /// <summary>Power-of-two size classes of byte arrays, each a bounded stack. Thread-safe.
    /// A chunk's frame is rented when it is sent and returned when its answer arrives (it is
    /// kept meanwhile, to send again after a resume).</summary>
    public sealed class BufferPool
    {
        const int MinShift = 8;   // 256 bytes
        const int MaxShift = 26;  // 64 MiB
        readonly Stack<byte[]>[] _classes = new Stack<byte[]>[MaxShift + 1];
        readonly int _keepPerClass;
        int _created;
        long _createdBytes;

        /// <summary>The pool shared by every client of the process.</summary>
        public static readonly BufferPool Shared = new BufferPool(256);

        public BufferPool(int keepPerClass)
        {
            _keepPerClass = keepPerClass;
            for (int i = MinShift; i <= MaxShift; i++) _classes[i] = new Stack<byte[]>();
        }

        static int ClassOf(int length)
        {
            int shift = MinShift;
            while ((1 << shift) < length) shift++;
            return shift;
        }

        /// <summary>A buffer of at least <paramref name="length"/> bytes (exactly a power of two).</summary>
        public byte[] Rent(int length)
        {
            int c = ClassOf(length);
            if (c > MaxShift) return new byte[length];
            var stack = _classes[c];
            lock (stack)
            {
                if (stack.Count > 0) return stack.Pop();
            }
            System.Threading.Interlocked.Increment(ref _created);
            System.Threading.Interlocked.Add(ref _createdBytes, 1L << c);
            return new byte[1 << c];
        }

        /// <summary>Buffers this pool had to allocate so far (steady streaming stops adding to it).</summary>
        public int Created { get { return System.Threading.Volatile.Read(ref _created); } }

        /// <summary>Bytes of the buffers counted in <see cref="Created"/>.</summary>
        public long CreatedBytes { get { return System.Threading.Interlocked.Read(ref _createdBytes); } }

        /// <summary>Give a buffer back (buffers not from <see cref="Rent"/> are dropped).</summary>
        public void Return(byte[] buffer)
        {
            if (buffer == null) return;
            int c = ClassOf(buffer.Length);
            if (c > MaxShift || buffer.Length != 1 << c) return;
            var stack = _classes[c];
            lock (stack)
            {
                if (stack.Count < _keepPerClass) stack.Push(buffer);
            }
        }

        /// <summary>Buffers waiting in the pool (for tests and diagnostics).</summary>
        public int Idle
        {
            get
            {
                int n = 0;
                for (int i = MinShift; i <= MaxShift; i++) lock (_classes[i]) n += _classes[i].Count;
                return n;
            }
        }
    }
}
