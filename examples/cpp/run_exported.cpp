// Runs a model trained and exported in Python (examples/python/export_encoder.py: torch.export, then
// AOTInductor) from C++ alone, and checks it against the logits the eager Python model gave.
//
//   run_exported <package.pt2> <io.pt>
//
// The compiled model calls relattn's ops through the torch dispatcher (torch.ops.relattn.*), so this
// program links relattn::relattn, which registers them when the library loads. Exits 1 if the outputs
// differ from Python's by more than 1e-4 or the accuracy is below 95%.
#include <cstdio>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/serialize.h>
#include <torch/torch.h>

#include <relattn/relattn.h>

namespace {

// The dict of tensors that export_encoder.py wrote with torch.save.
c10::Dict<c10::IValue, c10::IValue> load_tensors(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  TORCH_CHECK(file, "cannot open ", path);
  const std::vector<char> bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  return torch::pickle_load(bytes).toGenericDict();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s <package.pt2> <io.pt>\n", argv[0]);
    return 2;
  }
  // Referencing the library also keeps the linker from dropping it: the package finds relattn's ops in
  // the dispatcher only if librelattn is loaded.
  std::printf("relattn (CUDA kernels built: %s)\n", relattn::cuda_kernels_built() ? "yes" : "no");
  torch::inductor::AOTIModelPackageLoader model(argv[1]);
  // A package compiled for CUDA (export_encoder.py --device cuda) takes its inputs on the GPU.
  const torch::Device device(model.get_metadata().at("AOTI_DEVICE_KEY"));
  const auto io = load_tensors(argv[2]);

  bool ok = true;
  for (const int length : {32, 96}) {
    const auto get = [&](const char* name) { return io.at(name + ("_" + std::to_string(length))).toTensor(); };
    const torch::Tensor tokens = get("tokens"), padding = get("padding"), targets = get("targets");
    const torch::Tensor logits = model.run({tokens.to(device), padding.to(device)})[0].cpu();
    const double diff = (logits - get("logits")).abs().max().item<double>();
    const torch::Tensor real = targets != -100;
    const double accuracy =
        (logits.argmax(-1).masked_select(real) == targets.masked_select(real)).to(torch::kDouble).mean().item<double>();
    std::printf("%s, length %3d: %lld rows, max |C++ - Python| %.2e, accuracy %.3f\n", device.str().c_str(),
                length, static_cast<long long>(tokens.size(0)), diff, accuracy);
    ok = ok && diff < 1e-4 && accuracy >= 0.95;
  }
  std::printf("%s\n", ok ? "the C++ run matches Python" : "FAILED");
  return ok ? 0 : 1;
}
