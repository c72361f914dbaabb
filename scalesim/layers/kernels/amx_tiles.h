// AMX tiles for this project's kernels (paged_prefill_amx.h, amx_linear.cpp): the permission
// Linux asks for, one tile configuration (every tile 16 rows of 64 bytes), and a guard that holds
// it for one thread.
#pragma once

#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512BF16__)
#define SCALESIM_AMX_TILES 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

namespace scalesim::amx {

constexpr int64_t ROWS = 16;  // a tile's rows

// Linux lends the AMX state only to threads of a process that asked (once per process).
inline bool permitted() {
  static const bool ok = [] {
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Every tile 16 rows of 64 bytes: C tiles of 16 x 16 float32, A tiles of 16 x 32 bfloat16, B
// tiles of 16 rows of 16 pairs.
inline void configure() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) config.colsb[t] = 64, config.rows[t] = ROWS;
  _tile_loadconfig(&config);
}

// The tiles configured for this thread while it lives, released after (also when a task throws).
struct TileSession {
  TileSession() { configure(); }
  ~TileSession() { _tile_release(); }
  TileSession(const TileSession&) = delete;
  TileSession& operator=(const TileSession&) = delete;
};

}  // namespace scalesim::amx
#endif
