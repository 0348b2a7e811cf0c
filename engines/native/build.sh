#!/usr/bin/env bash
# Build the native sparse kernels (C++17) with the system compiler into engines/native/lib/.
# Each instruction set's file is compiled with its own flags; the library picks one at run time
# (AVX-512F where present, else AVX2+FMA+F16C, else the scalar reference), so it runs on any x86-64.
set -euo pipefail
cd "$(dirname "$0")"
CXX=${CXX:-}
if [ -z "$CXX" ]; then
  for c in g++ c++ clang++; do
    if command -v "$c" >/dev/null 2>&1; then CXX=$c; break; fi
  done
fi
if [ -z "$CXX" ] || ! command -v "$CXX" >/dev/null 2>&1; then
  echo "engines/native/build.sh: no C++17 compiler found (looked for g++, c++, clang++; set CXX=...)." >&2
  echo "Install one (Debian: apt-get install g++) and re-run scripts/install.sh; without it the sparse CPU engine is unavailable." >&2
  exit 1
fi
case "$(uname -m)" in
  x86_64|amd64) ;;
  *) echo "engines/native/build.sh: $(uname -m) is not x86-64; the kernels have AVX2/AVX-512 paths only, skipping" >&2; exit 2 ;;
esac
mkdir -p lib obj
FLAGS="-std=c++17 -O3 -fPIC -Wall -Wextra -fvisibility=hidden -DNDEBUG ${PK_EXTRA_FLAGS:-}"
"$CXX" $FLAGS -c src/scalar.cpp -o obj/scalar.o
"$CXX" $FLAGS -mavx2 -mfma -c src/avx2.cpp -o obj/avx2.o
# GCC 12 warns falsely inside its own intrinsics headers (their "__Y = __Y" undefined values)
"$CXX" $FLAGS -Wno-uninitialized -Wno-maybe-uninitialized -mavx512f -mavx2 -mfma -c src/avx512.cpp -o obj/avx512.o
"$CXX" $FLAGS -mavx2 -mfma -c src/twofour_avx2.cpp -o obj/twofour_avx2.o
"$CXX" $FLAGS -Wno-uninitialized -Wno-maybe-uninitialized -mavx512f -mavx2 -mfma -c src/twofour_avx512.cpp -o obj/twofour_avx512.o
"$CXX" $FLAGS -Wno-uninitialized -Wno-maybe-uninitialized -mavx512f -mavx2 -mfma -c src/decompress_avx512.cpp -o obj/decompress_avx512.o
"$CXX" $FLAGS -mavx2 -mfma -c src/twofour_int4_avx2.cpp -o obj/twofour_int4_avx2.o
"$CXX" $FLAGS -mavx2 -mfma -c src/bitmask_int4_avx2.cpp -o obj/bitmask_int4_avx2.o
"$CXX" $FLAGS -Wno-uninitialized -Wno-maybe-uninitialized -mavx512f -mavx2 -mfma -c src/bitmask_int4_avx512.cpp -o obj/bitmask_int4_avx512.o
"$CXX" $FLAGS -Wno-uninitialized -Wno-maybe-uninitialized -mavx512f -mavx2 -mfma -c src/twofour_int4_avx512.cpp -o obj/twofour_int4_avx512.o
"$CXX" $FLAGS -Wno-uninitialized -Wno-maybe-uninitialized -mavx512f -mavx512bw -mavx512vl -mavx512vnni -mavx2 -mfma -c src/vnni_avx512.cpp -o obj/vnni_avx512.o
"$CXX" $FLAGS -Wno-uninitialized -Wno-maybe-uninitialized -mavx512f -mavx2 -mfma -c src/int4_avx512.cpp -o obj/int4_avx512.o
"$CXX" $FLAGS -mavx2 -mfma -mf16c -c src/int4_avx2.cpp -o obj/int4_avx2.o
"$CXX" $FLAGS -Wno-uninitialized -Wno-maybe-uninitialized -mavx512f -mavx512bw -mavx512vl -mavx512vnni -mavx2 -mfma -c src/int4_vnni_avx512.cpp -o obj/int4_vnni_avx512.o
"$CXX" $FLAGS -mavx2 -mfma -mf16c -c src/int4_int8x_avx2.cpp -o obj/int4_int8x_avx2.o
"$CXX" $FLAGS -mavx2 -mfma -c src/twofour_int4_int8x_avx2.cpp -o obj/twofour_int4_int8x_avx2.o
"$CXX" $FLAGS -mavx2 -mfma -c src/int8_int8x_avx2.cpp -o obj/int8_int8x_avx2.o
"$CXX" $FLAGS -mavx2 -mfma -c src/sparse_x_avx2.cpp -o obj/sparse_x_avx2.o
"$CXX" $FLAGS -Wno-uninitialized -Wno-maybe-uninitialized -mavx512f -mavx2 -mfma -c src/sparse_x_avx512.cpp -o obj/sparse_x_avx512.o
"$CXX" $FLAGS -mavx2 -mfma -mf16c -c src/int4_x_avx2.cpp -o obj/int4_x_avx2.o
"$CXX" $FLAGS -Wno-uninitialized -Wno-maybe-uninitialized -mavx512f -mavx2 -mfma -c src/int4_x_avx512.cpp -o obj/int4_x_avx512.o
"$CXX" $FLAGS -Wno-uninitialized -Wno-maybe-uninitialized -mavx512f -mavx512bw -mavx512vl -mavx512vnni -mavx2 -mfma -c src/int4_x_vnni_avx512.cpp -o obj/int4_x_vnni_avx512.o
"$CXX" $FLAGS -Wno-uninitialized -Wno-maybe-uninitialized -mavx512f -mavx512bw -mavx512vl -mavx512vnni -mavx512vbmi2 -mpopcnt -mavx2 -mfma -c src/bitmask_int4_vnni_avx512.cpp -o obj/bitmask_int4_vnni_avx512.o
"$CXX" $FLAGS -Wno-uninitialized -Wno-maybe-uninitialized -mavx512f -mavx512bw -mavx512vl -mavx512vnni -mavx512vbmi -mavx2 -mfma -c src/twofour_int4_vnni_avx512.cpp -o obj/twofour_int4_vnni_avx512.o
"$CXX" $FLAGS -mavx2 -mfma -c src/layer_ops.cpp -o obj/layer_ops.o
"$CXX" $FLAGS -c src/api.cpp -o obj/api.o
# An AVX-512 file must hold nothing that runs or is shared outside the dispatch: no load-time
# constructor (_GLOBAL__sub_I_*) and no weak symbol the linker could pick for another file's caller —
# either would execute AVX-512 instructions on an AVX2-only CPU (SIGILL at load or at a call).
if command -v nm >/dev/null 2>&1; then
  for o in obj/*avx512*.o obj/vnni_avx512.o; do
    if nm "$o" | grep -E '_GLOBAL__sub_I| [WVu] ' >/dev/null; then
      echo "engines/native/build.sh: $o has a load-time constructor or a weak symbol (nm: $(nm "$o" | grep -E '_GLOBAL__sub_I| [WVu] ' | head -3 | tr '\n' ' ')); it would run AVX-512 code on AVX2-only CPUs" >&2
      exit 1
    fi
  done
fi
tmp=lib/.libprune_kernels.so.$$
"$CXX" -shared -o "$tmp" obj/scalar.o obj/avx2.o obj/avx512.o obj/twofour_avx2.o obj/twofour_avx512.o obj/decompress_avx512.o obj/twofour_int4_avx2.o obj/twofour_int4_avx512.o obj/bitmask_int4_avx2.o obj/bitmask_int4_avx512.o obj/vnni_avx512.o obj/int4_avx512.o obj/int4_avx2.o obj/int4_vnni_avx512.o obj/int4_int8x_avx2.o obj/twofour_int4_int8x_avx2.o obj/int8_int8x_avx2.o obj/sparse_x_avx2.o obj/sparse_x_avx512.o obj/int4_x_avx2.o obj/int4_x_avx512.o obj/int4_x_vnni_avx512.o obj/bitmask_int4_vnni_avx512.o obj/twofour_int4_vnni_avx512.o obj/layer_ops.o obj/api.o -pthread
mv -f "$tmp" lib/libprune_kernels.so
echo "built engines/native/lib/libprune_kernels.so with $CXX"
