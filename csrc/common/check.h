// Two kinds of failure, kept apart so users can tell "you called it wrong" from "we have a bug":
//   MECHINTERP_CHECK            user error   -> std::invalid_argument -> Python ValueError
//   MECHINTERP_INTERNAL_ASSERT  broken invariant -> mechinterp::InternalError -> RuntimeError
// Messages are the streamed arguments; they should name the argument, what was expected and what
// was given.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

#if defined(MECHINTERP_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace mechinterp {

// Deriving from logic_error (not invalid_argument) keeps bugs out of callers' ValueError handlers.
class InternalError : public std::logic_error {
 public:
  using std::logic_error::logic_error;
};

namespace detail {

template <typename... Args>
std::string concat(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  return os.str();
}

template <typename... Args>
[[noreturn]] void throw_user_error(Args&&... args) {
  throw std::invalid_argument(concat(std::forward<Args>(args)...));
}

template <typename... Args>
[[noreturn]] void throw_internal_error(const char* file, int line, const char* cond,
                                       Args&&... args) {
  throw InternalError(concat("mechinterp internal error, please report it with this message: ",
                             file, ":", line, ": expected ", cond, ". ",
                             std::forward<Args>(args)...));
}

}  // namespace detail
}  // namespace mechinterp

#define MECHINTERP_CHECK(cond, ...)                                 \
  do {                                                              \
    if (!(cond)) ::mechinterp::detail::throw_user_error(__VA_ARGS__); \
  } while (0)

#define MECHINTERP_INTERNAL_ASSERT(cond, ...)                                              \
  do {                                                                                     \
    if (!(cond))                                                                           \
      ::mechinterp::detail::throw_internal_error(__FILE__, __LINE__, #cond, __VA_ARGS__); \
  } while (0)

#if defined(MECHINTERP_WITH_CUDA)

namespace mechinterp::detail {
[[noreturn]] inline void throw_cuda_error(cudaError_t err, const char* expr, const char* file,
                                          int line) {
  throw std::runtime_error(concat("CUDA error ", cudaGetErrorName(err), " (",
                                  cudaGetErrorString(err), ") from ", expr, " at ", file, ":",
                                  line));
}
}  // namespace mechinterp::detail

#define MECHINTERP_CUDA_CHECK(expr)                                                   \
  do {                                                                                \
    const cudaError_t mechinterp_err_ = (expr);                                       \
    if (mechinterp_err_ != cudaSuccess)                                               \
      ::mechinterp::detail::throw_cuda_error(mechinterp_err_, #expr, __FILE__, __LINE__); \
  } while (0)

// A bad launch configuration is reported only through cudaGetLastError; read it right after the
// launch so the failure is blamed on the kernel that caused it.
#define MECHINTERP_CUDA_LAUNCH_CHECK() MECHINTERP_CUDA_CHECK(cudaGetLastError())

#endif  // MECHINTERP_WITH_CUDA
