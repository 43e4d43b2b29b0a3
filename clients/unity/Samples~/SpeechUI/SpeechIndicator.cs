// Sample: the microphone streamed to `speech_activity`; speech_start / speech_end drive a label.
using Realtime;
using Realtime.Unity;
using UnityEngine;

/// <summary>Shows "speaking" while the server says an utterance is open, with the last
/// utterance's start and length (the events' times are the audio's, not the frame's).</summary>
public sealed class SpeechIndicator : MonoBehaviour
{
    public MicrophoneStreamer microphone;

    bool _speaking;
    string _last = "say something";

    void Start()
    {
        microphone.Opened += stream => stream.OnEvent += OnSpeechEvent;
    }

    void OnSpeechEvent(RealtimeEvent e)
    {
        // Main thread: RealtimeConnection pumps callbacks in Update.
        if (e.Name == "speech_start")
        {
            _speaking = true;
            _last = "speaking since " + (e.T / 1000).ToString("0.00") + " s";
        }
        else if (e.Name == "speech_end")
        {
            _speaking = false;
            _last = "utterance " + e.Fields["segment"].AsLong() + ": " + (e.Fields["duration_ms"].AsDouble() / 1000).ToString("0.00") + " s";
        }
    }

    void OnGUI()
    {
        GUI.color = _speaking ? Color.green : Color.white;
        GUI.Label(new Rect(20, 20, 400, 40), (_speaking ? "SPEAKING  " : "silent  ") + _last);
    }
}
