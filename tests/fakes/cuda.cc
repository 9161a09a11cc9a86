// A stand-in for libcuda.so.1 where there is no GPU, for the tests that run
// libstmux.so's whole path in ordinary processes (shim_process_test): one
// device (UUID 0xab...), the process's current context 0x42, and host memory
// as "device" memory, each pointer an allocation of its own of 64 KiB (the
// tenant hands the shim only such pointers). The functions the shim looks up
// through cuGetProcAddress (shim/driver.h): streams are idle, so waits return
// at once; no module loads, so stream-ordered mode finds no kernel of its own
// and serves in host mode. Nothing here is a real GPU's behaviour to rely on
// beyond that.
#include <cuda.h>

#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string_view>

namespace {

constexpr std::size_t kAllocationBytes = 64 << 10;
const CUcontext kContext = reinterpret_cast<CUcontext>(0x42);

CUresult pointerGetAttributes(unsigned count, CUpointer_attribute* attributes, void** values,
                              CUdeviceptr pointer) {
  for (unsigned i = 0; i < count; ++i) {
    switch (attributes[i]) {
      case CU_POINTER_ATTRIBUTE_BUFFER_ID:
        *static_cast<unsigned long long*>(values[i]) = pointer >> 4;
        break;
      case CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL:
        *static_cast<int*>(values[i]) = 0;
        break;
      case CU_POINTER_ATTRIBUTE_MEMORY_TYPE:
        *static_cast<unsigned*>(values[i]) = CU_MEMORYTYPE_DEVICE;
        break;
      case CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE:
        *static_cast<int*>(values[i]) = 1;
        break;
      default:
        return CUDA_ERROR_INVALID_VALUE;
    }
  }
  return CUDA_SUCCESS;
}
CUresult memGetAddressRange(CUdeviceptr* base, size_t* bytes, CUdeviceptr pointer) {
  *base = pointer;
  *bytes = kAllocationBytes;
  return CUDA_SUCCESS;
}
CUresult ipcGetMemHandle(CUipcMemHandle* handle, CUdeviceptr pointer) {
  std::memset(handle, 0, sizeof(*handle));
  std::memcpy(handle, &pointer, sizeof(pointer));
  return CUDA_SUCCESS;
}
// FAKE_CUDA_BLOCKING_CAPTURE: a blocking stream of the context is being
// captured (another thread's), throughout. As CUDA documents it: asked about
// the legacy stream, cuStreamIsCapturing answers
// CUDA_ERROR_STREAM_CAPTURE_IMPLICIT and leaves the capture be; any other use
// of the legacy stream (work queued, a wait, a query) or a wait for the whole
// context is refused and would invalidate the capture, counted here
// (fakeCudaCaptureInvalidations).
bool blockingCapture() {
  static const bool on = std::getenv("FAKE_CUDA_BLOCKING_CAPTURE") != nullptr;
  return on;
}
std::atomic<int> g_invalidations{0};
extern "C" int fakeCudaCaptureInvalidations() {
  return g_invalidations.load();
}
// Whether `stream` is the legacy stream while the capture is open.
bool legacyInCapture(CUstream stream) {
  return blockingCapture() && (stream == nullptr || stream == CU_STREAM_LEGACY);
}
// CUDA_SUCCESS, or the refusal of a use of the legacy stream in a capture.
CUresult useOf(CUstream stream) {
  if (!legacyInCapture(stream)) return CUDA_SUCCESS;
  ++g_invalidations;
  return CUDA_ERROR_STREAM_CAPTURE_IMPLICIT;
}
CUresult streamIsCapturing(CUstream stream, CUstreamCaptureStatus* status) {
  if (legacyInCapture(stream)) return CUDA_ERROR_STREAM_CAPTURE_IMPLICIT;
  *status = CU_STREAM_CAPTURE_STATUS_NONE;
  return CUDA_SUCCESS;
}
CUresult ctxGetCurrent(CUcontext* context) {
  *context = kContext;
  return CUDA_SUCCESS;
}
CUresult ctxGetDevice(CUdevice* device) {
  *device = 0;
  return CUDA_SUCCESS;
}
// The context's flags, as cuCtxSetFlags leaves them; FAKE_CUDA_CTX_FLAGS
// sets them at first (a program's own choice, made before the shim's).
std::atomic<unsigned>& contextFlags() {
  static std::atomic<unsigned> flags{[] {
    const char* given = std::getenv("FAKE_CUDA_CTX_FLAGS");
    return given != nullptr ? static_cast<unsigned>(std::strtoul(given, nullptr, 0)) : 0u;
  }()};
  return flags;
}
CUresult ctxGetFlags(unsigned* flags) {
  *flags = contextFlags().load();
  return CUDA_SUCCESS;
}
CUresult deviceGet(CUdevice* device, int ordinal) {
  if (ordinal != 0) return CUDA_ERROR_INVALID_DEVICE;
  *device = 0;
  return CUDA_SUCCESS;
}
CUresult deviceGetUuid(CUuuid* uuid, CUdevice) {
  std::memset(uuid->bytes, 0xab, sizeof(uuid->bytes));
  return CUDA_SUCCESS;
}
CUresult deviceGetAttribute(int* value, CUdevice_attribute, CUdevice) {
  *value = 0;
  return CUDA_SUCCESS;
}
CUresult exchangeCaptureMode(CUstreamCaptureMode*) {
  return CUDA_SUCCESS;
}
CUresult streamGetFlags(CUstream, unsigned* flags) {
  *flags = CU_STREAM_DEFAULT;
  return CUDA_SUCCESS;
}
CUresult streamCreate(CUstream* stream, unsigned) {
  *stream = reinterpret_cast<CUstream>(0x51);
  return CUDA_SUCCESS;
}
CUresult eventCreate(CUevent* event, unsigned) {
  *event = reinterpret_cast<CUevent>(0x52);
  return CUDA_SUCCESS;
}
CUresult hostGetDevicePointer(CUdeviceptr* device, void* host, unsigned) {
  *device = reinterpret_cast<CUdeviceptr>(host);
  return CUDA_SUCCESS;
}
CUresult moduleLoadData(CUmodule*, const void*) {
  return CUDA_ERROR_NOT_SUPPORTED;
}
CUresult moduleGetFunction(CUfunction*, CUmodule, const char*) {
  return CUDA_ERROR_NOT_SUPPORTED;
}
CUresult occupancy(int* blocks, CUfunction, int, size_t) {
  *blocks = 1;
  return CUDA_SUCCESS;
}
CUresult launchKernel(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                      unsigned, CUstream, void**, void**) {
  return CUDA_ERROR_NOT_SUPPORTED;
}
CUresult streamWriteValue32(CUstream stream, CUdeviceptr address, cuuint32_t value, unsigned) {
  if (const CUresult refused = useOf(stream); refused != CUDA_SUCCESS) return refused;
  __atomic_store_n(reinterpret_cast<cuuint32_t*>(address), value, __ATOMIC_RELEASE);
  return CUDA_SUCCESS;
}
// Waits and what needs no answer: an idle stream has nothing to wait for.
CUresult ctxSynchronize() {
  if (!blockingCapture()) return CUDA_SUCCESS;
  ++g_invalidations;
  return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
}
CUresult ctxGetId(CUcontext, unsigned long long* id) {
  *id = 1;
  return CUDA_SUCCESS;
}
CUresult streamSynchronize(CUstream stream) {
  return useOf(stream);
}
CUresult ctxSetFlags(unsigned flags) {
  contextFlags().store(flags);
  return CUDA_SUCCESS;
}
CUresult ctxSetCurrent(CUcontext) {
  return CUDA_SUCCESS;
}
CUresult streamWaitEvent(CUstream stream, CUevent, unsigned) {
  return useOf(stream);
}
CUresult eventRecord(CUevent, CUstream stream) {
  return useOf(stream);
}
CUresult streamWaitValue32(CUstream stream, CUdeviceptr, cuuint32_t, unsigned) {
  return useOf(stream);
}
CUresult memHostRegister(void*, size_t, unsigned) {
  return CUDA_SUCCESS;
}

struct Entry {
  std::string_view name;
  void* function;
};
const Entry kEntries[] = {
    {"cuPointerGetAttributes", reinterpret_cast<void*>(pointerGetAttributes)},
    {"cuMemGetAddressRange", reinterpret_cast<void*>(memGetAddressRange)},
    {"cuIpcGetMemHandle", reinterpret_cast<void*>(ipcGetMemHandle)},
    {"cuStreamIsCapturing", reinterpret_cast<void*>(streamIsCapturing)},
    {"cuCtxGetCurrent", reinterpret_cast<void*>(ctxGetCurrent)},
    {"cuCtxGetId", reinterpret_cast<void*>(ctxGetId)},
    {"cuCtxGetDevice", reinterpret_cast<void*>(ctxGetDevice)},
    {"cuCtxGetFlags", reinterpret_cast<void*>(ctxGetFlags)},
    {"cuDeviceGet", reinterpret_cast<void*>(deviceGet)},
    {"cuDeviceGetUuid", reinterpret_cast<void*>(deviceGetUuid)},
    {"cuDeviceGetAttribute", reinterpret_cast<void*>(deviceGetAttribute)},
    {"cuThreadExchangeStreamCaptureMode", reinterpret_cast<void*>(exchangeCaptureMode)},
    {"cuStreamGetFlags", reinterpret_cast<void*>(streamGetFlags)},
    {"cuStreamCreate", reinterpret_cast<void*>(streamCreate)},
    {"cuEventCreate", reinterpret_cast<void*>(eventCreate)},
    {"cuMemHostGetDevicePointer", reinterpret_cast<void*>(hostGetDevicePointer)},
    {"cuModuleLoadData", reinterpret_cast<void*>(moduleLoadData)},
    {"cuModuleGetFunction", reinterpret_cast<void*>(moduleGetFunction)},
    {"cuOccupancyMaxActiveBlocksPerMultiprocessor", reinterpret_cast<void*>(occupancy)},
    {"cuLaunchKernel", reinterpret_cast<void*>(launchKernel)},
    {"cuCtxSynchronize", reinterpret_cast<void*>(ctxSynchronize)},
    {"cuStreamSynchronize", reinterpret_cast<void*>(streamSynchronize)},
    {"cuStreamQuery", reinterpret_cast<void*>(streamSynchronize)},
    {"cuCtxSetFlags", reinterpret_cast<void*>(ctxSetFlags)},
    {"cuCtxSetCurrent", reinterpret_cast<void*>(ctxSetCurrent)},
    {"cuStreamWaitEvent", reinterpret_cast<void*>(streamWaitEvent)},
    {"cuEventRecord", reinterpret_cast<void*>(eventRecord)},
    {"cuStreamWriteValue32", reinterpret_cast<void*>(streamWriteValue32)},
    {"cuStreamWaitValue32", reinterpret_cast<void*>(streamWaitValue32)},
    {"cuMemHostRegister", reinterpret_cast<void*>(memHostRegister)},
};

// FAKE_CUDA_LOAD_MS: loading takes that long, as a real driver's first load
// may, for a test to act while a thread is inside it.
__attribute__((constructor)) void slowLoad() {
  if (const char* ms = std::getenv("FAKE_CUDA_LOAD_MS")) ::usleep(std::atoi(ms) * 1000);
}

}  // namespace

// The real driver reads CUDA_MPS_PIPE_DIRECTORY through getenv once, as it
// starts, to find the MPS control daemon (shim/mps_steer.cc); this one does
// the same in cuInit and tells what it was told.
namespace {
const char* g_mps_pipes = nullptr;
}  // namespace
extern "C" CUresult cuInit(unsigned) {
  g_mps_pipes = std::getenv("CUDA_MPS_PIPE_DIRECTORY");
  return CUDA_SUCCESS;
}
extern "C" const char* fakeCudaMpsPipeDirectory() {
  return g_mps_pipes != nullptr ? g_mps_pipes : "(unset)";
}

extern "C" CUresult cuGetProcAddress_v2(const char* symbol, void** function, int, cuuint64_t,
                                        CUdriverProcAddressQueryResult* status) {
  for (const Entry& entry : kEntries) {
    if (entry.name == symbol) {
      *function = entry.function;
      if (status != nullptr) *status = CU_GET_PROC_ADDRESS_SUCCESS;
      return CUDA_SUCCESS;
    }
  }
  *function = nullptr;
  if (status != nullptr) *status = CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND;
  return CUDA_ERROR_NOT_FOUND;
}
