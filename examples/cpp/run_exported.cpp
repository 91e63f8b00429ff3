// Runs a model trained in Python (examples/python/export_encoder.py) from C++ alone, two ways, and checks
// both against the logits the eager Python model gave:
//   1. the AOTInductor package (torch.export, then AOTInductor): the compiled graph, no model code here;
//   2. the same model built here from relattn::nn modules, with the Python weights loaded by name
//      (relattn::nn::load_state_dict): eager C++, which can also go on training.
//
//   run_exported <package.pt2> <io.pt> <state.pt> [<state out.pt>]
//
// With a fourth argument it writes the C++ model's weights back in Python's layout
// (relattn::nn::save_state_dict), for `export_encoder.py --check-cpp-weights` to load into Python.
//
// The compiled model calls relattn's ops through the torch dispatcher (torch.ops.relattn.*), so this
// program links relattn::relattn, which registers them when the library loads. Exits 1 if any output
// differs from Python's by more than 1e-4 or an accuracy is below 95%.
#include <cstdio>
#include <fstream>
#include <functional>
#include <iterator>
#include <string>
#include <vector>

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/serialize.h>
#include <torch/torch.h>

#include <relattn/nn.h>
#include <relattn/relattn.h>

namespace rnn = relattn::nn;

namespace {

// The dict of tensors that export_encoder.py wrote with torch.save.
c10::Dict<c10::IValue, c10::IValue> load_tensors(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  TORCH_CHECK(file, "cannot open ", path);
  const std::vector<char> bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  return torch::pickle_load(bytes).toGenericDict();
}

// export_encoder.py's CopyBack model, with the same submodule names, so the Python weights load by name.
struct CopyBack : torch::nn::Module {
  torch::nn::Embedding embed{nullptr};
  rnn::RelativeTransformerEncoder encoder{nullptr};
  torch::nn::Linear head{nullptr};

  CopyBack() {
    embed = register_module("embed", torch::nn::Embedding(16, 64));
    const auto layer = rnn::RelativeTransformerEncoderLayerOptions(64, 4)
                           .dim_feedforward(128)
                           .dropout(0.0)
                           .norm_first(true)
                           .position("shaw")
                           .max_distance(4);
    encoder = register_module(
        "encoder", rnn::RelativeTransformerEncoder(rnn::RelativeTransformerEncoderOptions(layer, 2).norm(
                       torch::nn::AnyModule(torch::nn::LayerNorm(torch::nn::LayerNormOptions({64}))))));
    head = register_module("head", torch::nn::Linear(64, 16));
  }

  torch::Tensor forward(const torch::Tensor& tokens, const torch::Tensor& padding) {
    return head(encoder(embed(tokens), padding));
  }
};

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4 && argc != 5) {
    std::fprintf(stderr, "usage: %s <package.pt2> <io.pt> <state.pt> [<state out.pt>]\n", argv[0]);
    return 2;
  }
  // Referencing the library also keeps the linker from dropping it: the package finds relattn's ops in
  // the dispatcher only if librelattn is loaded.
  std::printf("relattn (CUDA kernels built: %s)\n", relattn::cuda_kernels_built() ? "yes" : "no");
  torch::inductor::AOTIModelPackageLoader package(argv[1]);
  // A package compiled for CUDA (export_encoder.py --device cuda) takes its inputs on the GPU.
  const torch::Device device(package.get_metadata().at("AOTI_DEVICE_KEY"));
  const auto io = load_tensors(argv[2]);
  CopyBack model;
  rnn::load_state_dict(model, argv[3]);
  model.eval();
  model.to(device);

  using Run = std::function<torch::Tensor(const torch::Tensor&, const torch::Tensor&)>;
  const std::vector<std::pair<const char*, Run>> runs = {
      {"AOTInductor package", [&](const torch::Tensor& t, const torch::Tensor& p) { return package.run({t, p})[0]; }},
      {"relattn::nn + Python weights", [&](const torch::Tensor& t, const torch::Tensor& p) {
         torch::NoGradGuard no_grad;
         return model.forward(t, p);
       }}};
  bool ok = true;
  for (const auto& [name, run] : runs) {
    for (const int length : {32, 96}) {
      const auto get = [&](const char* key) { return io.at(key + ("_" + std::to_string(length))).toTensor(); };
      const torch::Tensor tokens = get("tokens"), padding = get("padding"), targets = get("targets");
      const torch::Tensor logits = run(tokens.to(device), padding.to(device)).cpu();
      const double diff = (logits - get("logits")).abs().max().item<double>();
      const torch::Tensor real = targets != -100;
      const double accuracy = (logits.argmax(-1).masked_select(real) == targets.masked_select(real))
                                  .to(torch::kDouble)
                                  .mean()
                                  .item<double>();
      std::printf("%-30s %s, length %3d: %lld rows, max |C++ - Python| %.2e, accuracy %.3f\n", name,
                  device.str().c_str(), length, static_cast<long long>(tokens.size(0)), diff, accuracy);
      ok = ok && diff < 1e-4 && accuracy >= 0.95;
    }
  }
  if (argc == 5) rnn::save_state_dict(model, argv[4]);
  std::printf("%s\n", ok ? "the C++ runs match Python" : "FAILED");
  return ok ? 0 : 1;
}
