// Where callbacks run: on the thread that calls Pump (Unity's main thread, from Update), or at
// once on the thread that received the message.
using System;
using System.Collections.Generic;

namespace Realtime
{
    /// <summary>Which thread runs result, event and error callbacks.</summary>
    public enum CallbackThread
    {
        /// <summary>Queued, run by <see cref="RealtimeClient.Pump"/> (call it from Update; the
        /// RealtimeConnection component does). Unity objects may be touched in callbacks.</summary>
        MainThread,
        /// <summary>Run at once on the receiving thread (lowest latency; do not touch Unity
        /// objects there).</summary>
        Worker,
    }

    /// <summary>A FIFO of deliveries, drained by <see cref="Pump"/>. Deliveries are structs in a
    /// reused queue: nothing is allocated per message beyond the message itself.</summary>
    internal sealed class Dispatcher
    {
        internal enum Kind : byte { Result, Event, Error, Closed, ClientError, GoingAway, Status, Disconnected }

        internal struct Delivery
        {
            public Kind Kind;
            public RealtimeStream Stream;
            public object Payload;
        }

        readonly Queue<Delivery> _queue = new Queue<Delivery>();
        readonly Action<Delivery> _run;
        Delivery[] _batch = new Delivery[64];
        int _pumping;

        public Dispatcher(Action<Delivery> run) { _run = run; }

        public void Post(Kind kind, RealtimeStream stream, object payload)
        {
            var d = new Delivery { Kind = kind, Stream = stream, Payload = payload };
            lock (_queue) _queue.Enqueue(d);
        }

        /// <summary>Run every queued delivery, in order; returns how many ran. One pump at a
        /// time: a call while another pumps (a callback pumping again, or a second thread)
        /// returns 0 at once, and what it posted is run by the pump in progress.</summary>
        public int Pump()
        {
            int total = 0;
            while (System.Threading.Interlocked.Exchange(ref _pumping, 1) == 0)
            {
                try
                {
                    total += Drain();
                }
                finally
                {
                    System.Threading.Volatile.Write(ref _pumping, 0);
                }
                // A delivery posted after the drain's last look, by a caller that found us
                // pumping, would wait for the next pump: look again now that we stopped.
                lock (_queue) if (_queue.Count == 0) break;
            }
            return total;
        }

        int Drain()
        {
            int total = 0;
            while (true)
            {
                int n;
                lock (_queue)
                {
                    n = _queue.Count;
                    if (n == 0) return total;
                    if (_batch.Length < n) _batch = new Delivery[Math.Max(n, 2 * _batch.Length)];
                    for (int i = 0; i < n; i++) _batch[i] = _queue.Dequeue();
                }
                for (int i = 0; i < n; i++)
                {
                    var d = _batch[i];
                    _batch[i] = default(Delivery);
                    _run(d);
                }
                total += n;
            }
        }
    }
}
