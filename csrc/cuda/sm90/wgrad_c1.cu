// Weight-gradient grouped GEMM (per expert (X, Y, rows_e); A = a_NX's rows transposed, B = g_NY's
// rows), configuration 1: 128 x 128 x 64 CTA tile, cluster 1 x 1, ping-pong warp groups.
#include "grouped_gemm_sm90.cuh"

using WgradTile1 = moe::cuda::sm90::TileConfig<128, 128, 64, 1, true>;
MOE_SM90_WGRAD(1, ::WgradTile1)
