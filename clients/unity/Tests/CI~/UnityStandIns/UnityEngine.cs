// Stand-ins for the few Unity types the package's Unity-facing code uses, with Unity's
// signatures, so CI compiles that code with Mono's mcs (nothing is left uncompiled). They do
// nothing: the behaviour is checked in Unity, the compile is checked here. This folder ends in
// "~", so Unity never imports it next to the real UnityEngine.
using System;

namespace UnityEngine
{
    public class Object { public string name; }
    public class Component : Object { public Transform transform; public GameObject gameObject; }
    public class Behaviour : Component { public bool enabled; }
    public class MonoBehaviour : Behaviour { }
    public class GameObject : Object { public Transform transform; }

    public class Transform : Component
    {
        public Vector3 position;
        public Quaternion rotation;
        public Vector3 localScale;
        public void SetPositionAndRotation(Vector3 p, Quaternion q) { position = p; rotation = q; }
    }

    public struct Vector3
    {
        public float x, y, z;
        public Vector3(float x, float y, float z) { this.x = x; this.y = y; this.z = z; }
        public static Vector3 zero { get { return new Vector3(); } }
        public static Vector3 one { get { return new Vector3(1, 1, 1); } }
        public static Vector3 Lerp(Vector3 a, Vector3 b, float t) { return a; }
    }

    public struct Quaternion
    {
        public float x, y, z, w;
        public Quaternion(float x, float y, float z, float w) { this.x = x; this.y = y; this.z = z; this.w = w; }
        public static Quaternion identity { get { return new Quaternion(0, 0, 0, 1); } }
        public static Quaternion Euler(float x, float y, float z) { return identity; }
        public static Quaternion Slerp(Quaternion a, Quaternion b, float t) { return a; }
    }

    public struct Pose
    {
        public Vector3 position;
        public Quaternion rotation;
        public Pose(Vector3 position, Quaternion rotation) { this.position = position; this.rotation = rotation; }
    }

    public struct Color
    {
        public float r, g, b, a;
        public Color(float r, float g, float b, float a = 1) { this.r = r; this.g = g; this.b = b; this.a = a; }
        public static Color green { get { return new Color(0, 1, 0); } }
        public static Color gray { get { return new Color(0.5f, 0.5f, 0.5f); } }
        public static Color white { get { return new Color(1, 1, 1); } }
    }

    public struct Rect
    {
        public Rect(float x, float y, float width, float height) { }
    }

    public static class Debug
    {
        public static void Log(object message) { }
        public static void LogWarning(object message) { }
        public static void LogError(object message) { }
        public static void LogException(Exception exception) { }
    }

    public static class Time
    {
        public static float deltaTime;
        public static float time;
        public static double realtimeSinceStartupAsDouble;
    }

    [AttributeUsage(AttributeTargets.Field)] public sealed class TooltipAttribute : Attribute { public TooltipAttribute(string tooltip) { } }
    [AttributeUsage(AttributeTargets.Field)] public sealed class HeaderAttribute : Attribute { public HeaderAttribute(string header) { } }
    [AttributeUsage(AttributeTargets.Field)] public sealed class SerializeField : Attribute { }

    public sealed class AudioClip : Object
    {
        public int samples;
        public int channels;
        public int frequency;
        public bool GetData(float[] data, int offsetSamples) { return true; }
    }

    public static class Microphone
    {
        public static string[] devices = new string[0];
        public static AudioClip Start(string deviceName, bool loop, int lengthSec, int frequency) { return null; }
        public static void End(string deviceName) { }
        public static int GetPosition(string deviceName) { return 0; }
        public static bool IsRecording(string deviceName) { return false; }
    }

    public class Texture : Object { public int width, height; }

    public enum RenderTextureFormat { ARGB32 }
    public enum TextureFormat { RGB24, RGBA32 }

    public class RenderTexture : Texture
    {
        public static RenderTexture active;
        public RenderTexture(int width, int height, int depth, RenderTextureFormat format) { }
        public void Release() { }
    }

    public class Texture2D : Texture
    {
        public Texture2D(int width, int height, TextureFormat format, bool mipChain) { }
        public void ReadPixels(Rect source, int destX, int destY, bool recalculateMipMaps) { }
        public Unity.Collections.NativeArray<T> GetRawTextureData<T>() where T : struct { return new Unity.Collections.NativeArray<T>(); }
    }

    public class Camera : Behaviour { public RenderTexture targetTexture; }

    public static class Graphics { public static void Blit(Texture source, RenderTexture dest) { } }

    public static class SystemInfo { public static bool supportsAsyncGPUReadback; }
}

namespace UnityEngine.Rendering
{
    public struct AsyncGPUReadbackRequest
    {
        public bool hasError { get { return false; } }
        public bool done { get { return true; } }
        public Unity.Collections.NativeArray<T> GetData<T>(int layer = 0) where T : struct { return new Unity.Collections.NativeArray<T>(); }
    }

    public static class AsyncGPUReadback
    {
        public static AsyncGPUReadbackRequest Request(Texture src, int mipIndex, TextureFormat dstFormat, Action<AsyncGPUReadbackRequest> callback)
        {
            return new AsyncGPUReadbackRequest();
        }
    }
}

namespace UnityEngine.XR
{
    public enum XRNode { LeftEye, RightEye, CenterEye, Head, LeftHand, RightHand }

    public struct InputFeatureUsage<T>
    {
        public string name;
        public InputFeatureUsage(string usageName) { name = usageName; }
    }

    public static class CommonUsages
    {
        public static InputFeatureUsage<Vector3> devicePosition = new InputFeatureUsage<Vector3>("DevicePosition");
        public static InputFeatureUsage<Quaternion> deviceRotation = new InputFeatureUsage<Quaternion>("DeviceRotation");
    }

    public struct InputDevice
    {
        public bool isValid { get { return false; } }
        public bool TryGetFeatureValue(InputFeatureUsage<Vector3> usage, out Vector3 value) { value = Vector3.zero; return false; }
        public bool TryGetFeatureValue(InputFeatureUsage<Quaternion> usage, out Quaternion value) { value = Quaternion.identity; return false; }
    }

    public static class InputDevices
    {
        public static InputDevice GetDeviceAtXRNode(XRNode node) { return new InputDevice(); }
    }
}

namespace UnityEngine.UI
{
    public class Graphic : Behaviour { public Color color; }
    public class Text : Graphic { public string text; }
}

namespace Unity.Collections
{
    public struct NativeArray<T> where T : struct
    {
        public int Length { get { return 0; } }
        public static void Copy(NativeArray<T> src, int srcIndex, T[] dst, int dstIndex, int length) { }
    }
}

namespace AOT
{
    [AttributeUsage(AttributeTargets.Method)]
    public sealed class MonoPInvokeCallbackAttribute : Attribute { public MonoPInvokeCallbackAttribute(Type type) { } }
}

namespace UnityEngine
{
    public static class GUI
    {
        public static Color color;
        public static void Label(Rect position, string text) { }
    }

    public static class Mathf
    {
        public static float Cos(float f) { return (float)Math.Cos(f); }
        public static float Sin(float f) { return (float)Math.Sin(f); }
    }
}
