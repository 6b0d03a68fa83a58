// C++ exceptions that bindings.cpp turns into specific Python exceptions.
// (std::invalid_argument already becomes ValueError, std::out_of_range
// IndexError, and any other std::exception RuntimeError.)
#pragma once

#include <stdexcept>
#include <string>

namespace tiny_llm {

// -> TypeError: an argument has the wrong dtype.
struct TypeError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// -> NotImplementedError: a learner task that is not done yet.
struct NotImplemented : std::logic_error {
  using std::logic_error::logic_error;
};

} // namespace tiny_llm
