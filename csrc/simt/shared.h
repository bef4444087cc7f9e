#pragma once
// Checked shared memory for the SIMT emulation build. Kernels declare shared arrays through the
// macros of common/shared_memory.cuh; under nvcc they are plain __shared__ arrays, here they are
// views whose every element access is bounds-checked and recorded in shadow state (who wrote it,
// in which barrier epoch), so the runtime can report out-of-bounds indices, reads of unwritten
// (poisoned) memory and races between barriers.
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>

#include "simt/runtime.h"

namespace fsskern {
namespace simt {

template <typename T>
class SharedPtr;

// One element: reading converts to T, writing assigns; both are recorded.
template <typename T>
class SharedRef {
 public:
  SharedRef(T* p, size_t shadow, size_t shadow_element, const char* name)
      : p_(p), shadow_(shadow), shadow_element_(shadow_element), name_(name) {}
  operator T() const {
    shared_access(shadow_, shadow_element_, Access::Read, name_);
    return *p_;
  }
  const SharedRef& operator=(T v) const {
    shared_access(shadow_, shadow_element_, Access::Write, name_);
    *p_ = v;
    return *this;
  }
  const SharedRef& operator=(const SharedRef& other) const { return *this = static_cast<T>(other); }
  const SharedRef& operator+=(T v) const { return *this = static_cast<T>(*this) + v; }
  const SharedRef& operator-=(T v) const { return *this = static_cast<T>(*this) - v; }
  const SharedRef& operator*=(T v) const { return *this = static_cast<T>(*this) * v; }
  const SharedRef& operator|=(T v) const { return *this = static_cast<T>(*this) | v; }
  const SharedRef& operator&=(T v) const { return *this = static_cast<T>(*this) & v; }
  SharedPtr<T> operator&() const;
  // Atomics on shared memory: one block runs on one OS thread, so a plain read-modify-write is
  // atomic here. Atomics do not race with each other, only with plain accesses.
  T* raw_for_atomic() const {
    shared_access(shadow_, shadow_element_, Access::Atomic, name_);
    return p_;
  }

 private:
  T* p_;
  size_t shadow_, shadow_element_;
  const char* name_;
};

// A checked pointer into a shared array (what a row or &array[i] gives): `size` elements from
// `base`, whose element k has shadow entry shadow_base + k * stride.
template <typename T>
class SharedPtr {
 public:
  SharedPtr(T* base, size_t size, size_t shadow, size_t shadow_base, size_t stride, int64_t offset, const char* name)
      : base_(base), size_(size), shadow_(shadow), shadow_base_(shadow_base), stride_(stride), offset_(offset),
        name_(name) {}
  SharedRef<T> operator[](int64_t i) const {
    const int64_t at = offset_ + i;
    if (at < 0 || at >= static_cast<int64_t>(size_)) {
      fail("indexes shared " + std::string(name_) + " at " + std::to_string(at) + ", outside its " +
           std::to_string(size_) + " elements");
    }
    return SharedRef<T>(base_ + at, shadow_, shadow_base_ + at * stride_, name_);
  }
  SharedRef<T> operator*() const { return (*this)[0]; }
  SharedPtr operator+(int64_t i) const {
    return SharedPtr(base_, size_, shadow_, shadow_base_, stride_, offset_ + i, name_);
  }

 private:
  T* base_;
  size_t size_, shadow_, shadow_base_, stride_;
  int64_t offset_;
  const char* name_;
};

template <typename T>
SharedPtr<T> SharedRef<T>::operator&() const {
  // The pointer knows only this element; indexing away from it is checked against one element.
  return SharedPtr<T>(p_, 1, shadow_, shadow_element_, 1, 0, name_);
}

template <typename T, size_t N>
class SharedArray {
 public:
  SharedArray(const char* name, const void* site) : name_(name) {
    static_assert(std::is_trivially_copyable_v<T>, "shared arrays hold trivially copyable types");
    data_ = static_cast<T*>(block_shared(site, N * sizeof(T), sizeof(T), std::is_floating_point_v<T>, &shadow_));
  }
  SharedRef<T> operator[](int64_t i) const { return SharedPtr<T>(data_, N, shadow_, 0, 1, 0, name_)[i]; }

 private:
  T* data_;
  size_t shadow_;
  const char* name_;
};

template <typename T, size_t R, size_t C>
class SharedArray2D {
 public:
  SharedArray2D(const char* name, const void* site) : name_(name) {
    static_assert(std::is_trivially_copyable_v<T>, "shared arrays hold trivially copyable types");
    data_ = static_cast<T*>(block_shared(site, R * C * sizeof(T), sizeof(T), std::is_floating_point_v<T>, &shadow_));
  }
  // Row r, itself bounds-checked against C (so [r][C] is caught, not silently row r + 1).
  SharedPtr<T> operator[](int64_t r) const {
    if (r < 0 || r >= static_cast<int64_t>(R)) {
      fail("indexes shared " + std::string(name_) + " at row " + std::to_string(r) + ", outside its " +
           std::to_string(R) + " rows");
    }
    return SharedPtr<T>(data_ + r * C, C, shadow_, r * C, 1, 0, name_);
  }

 private:
  T* data_;
  size_t shadow_;
  const char* name_;
};

// The dynamic segment (size given at launch), viewed as T.
template <typename T>
SharedPtr<T> dynamic_shared(const char* name) {
  size_t bytes = 0, shadow = 0;
  T* data = static_cast<T*>(block_dynamic_shared(&bytes, &shadow));
  return SharedPtr<T>(data, bytes / sizeof(T), shadow, 0, sizeof(T), 0, name);
}

}  // namespace simt
}  // namespace fsskern
