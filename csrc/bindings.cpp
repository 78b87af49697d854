#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>

#include "common/build_info.h"
#include "common/check.h"
#include "common/pyview.h"
#include "heads/heads.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "mechinterp's compiled kernels. Call them through mechinterp._ops, which validates.";

  // std::invalid_argument already becomes ValueError. InternalError is a std::logic_error, which
  // pybind11 would only reach through its catch-all; name the mapping so it cannot drift.
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const mechinterp::InternalError& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    }
  });

  m.def(
      "diagonal_score",
      [](py::handle pattern, py::handle out, std::int64_t offset, std::int64_t first_query,
         std::uintptr_t stream) {
        const auto pattern_view = mechinterp::view_from_py(pattern, "pattern");
        const auto out_view = mechinterp::view_from_py(out, "out");
        py::gil_scoped_release release;
        mechinterp::heads::diagonal_score(pattern_view, out_view, offset, first_query, stream);
      },
      py::arg("pattern"), py::arg("out"), py::arg("offset"), py::arg("first_query"),
      py::arg("stream"),
      "out[h] = mean over batch b and query q in [max(first_query, offset), query) of "
      "pattern[b, h, q, q - offset]. pattern: view of [batch, head, query, query]; out: view of "
      "[head], float64 for float64 input else float32, written in place; stream: cudaStream_t as "
      "int (ignored on CPU).");

  m.def(
      "build_info",
      []() {
        const mechinterp::BuildInfo info = mechinterp::build_info();
        py::dict d;
        d["version"] = info.version;
        d["cuda"] = info.cuda;
        d["cuda_archs"] = info.cuda_archs;
        d["cuda_version"] = info.cuda_version;
        d["openmp"] = info.openmp;
        d["cpu_threads"] = info.cpu_threads;
        d["compiler"] = info.compiler;
        return d;
      },
      "What this build contains: version, cuda, cuda_archs, cuda_version, openmp, cpu_threads, "
      "compiler.");
}
