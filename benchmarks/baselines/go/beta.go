package main

import "math"

// rng is xoshiro256** (Blackman and Vigna, 2018): 256 bits of state, a period of 2^256 - 1, a few
// nanoseconds per 64-bit output. It is a plain value, owned by one request at a time (see scratch), so
// no draw takes a lock.
type rng struct{ s0, s1, s2, s3 uint64 }

// seed expands a 64-bit seed into the whole state with splitmix64, as the xoshiro authors recommend: it
// never yields the all-zero state, and nearby seeds give unrelated streams.
func (r *rng) seed(seed uint64) {
	next := func() uint64 {
		seed += 0x9e3779b97f4a7c15
		z := seed
		z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
		z = (z ^ (z >> 27)) * 0x94d049bb133111eb
		return z ^ (z >> 31)
	}
	r.s0, r.s1, r.s2, r.s3 = next(), next(), next(), next()
}

func rotl(x uint64, k uint) uint64 { return (x << k) | (x >> (64 - k)) }

func (r *rng) next() uint64 {
	out := rotl(r.s1*5, 7) * 9
	t := r.s1 << 17
	r.s2 ^= r.s0
	r.s3 ^= r.s1
	r.s1 ^= r.s2
	r.s0 ^= r.s3
	r.s2 ^= t
	r.s3 = rotl(r.s3, 45)
	return out
}

// uniform is in [0, 1) with 53 random bits.
func (r *rng) uniform() float64 { return float64(r.next()>>11) * 0x1p-53 }

// uniformOpen is in (0, 1): safe to take the logarithm of.
func (r *rng) uniformOpen() float64 { return (float64(r.next()>>11) + 0.5) * 0x1p-53 }

// Ziggurat tables for the standard normal (Marsaglia and Tsang, "The Ziggurat Method for Generating
// Random Variables", J. Stat. Softw. 5(8), 2000): 128 layers of equal area, the base layer ending at
// zigR. zigK[i] is the integer bound under which a point of layer i lies inside the curve for sure,
// zigW[i] scales a 32-bit integer to x, zigF[i] is the density at the layer's edge.
const (
	zigR      = 3.442619855899
	zigV      = 9.91256303526217e-3 // area of each layer
	zigScale  = 2147483648.0        // 2^31: hz is a signed 32-bit integer
	zigLayers = 128
)

var (
	zigK [zigLayers]uint32
	zigW [zigLayers]float64
	zigF [zigLayers]float64
)

func init() {
	dn, tn := zigR, zigR
	q := zigV / math.Exp(-0.5*dn*dn)
	zigK[0] = uint32(dn / q * zigScale)
	zigK[1] = 0
	zigW[0] = q / zigScale
	zigW[zigLayers-1] = dn / zigScale
	zigF[0] = 1
	zigF[zigLayers-1] = math.Exp(-0.5 * dn * dn)
	for i := zigLayers - 2; i >= 1; i-- {
		dn = math.Sqrt(-2 * math.Log(zigV/dn+math.Exp(-0.5*dn*dn)))
		zigK[i+1] = uint32(dn / tn * zigScale)
		tn = dn
		zigF[i] = math.Exp(-0.5 * dn * dn)
		zigW[i] = dn / zigScale
	}
}

// normal draws a standard normal deviate.
func (r *rng) normal() float64 {
	for {
		u := r.next()
		// The layer comes from the low bits and the position from the high 32, so the two are independent
		// (the original draws both from one 32-bit word, which correlates them).
		i := u & (zigLayers - 1)
		hz := int32(u >> 32)
		x := float64(hz) * zigW[i]
		abs := hz
		if abs < 0 {
			abs = -abs // -MinInt32 stays MinInt32, whose uint32 (2^31) exceeds every bound: it falls through.
		}
		if uint32(abs) < zigK[i] {
			return x // inside the rectangle: about 99% of draws end here
		}
		if i == 0 {
			// The tail beyond zigR, by Marsaglia's exponential method (1964).
			for {
				xt := -math.Log(r.uniformOpen()) / zigR
				y := -math.Log(r.uniformOpen())
				if y+y >= xt*xt {
					if hz > 0 {
						return zigR + xt
					}
					return -zigR - xt
				}
			}
		}
		// The wedge between the rectangle and the curve: accept under the density.
		if zigF[i]+r.uniform()*(zigF[i-1]-zigF[i]) < math.Exp(-0.5*x*x) {
			return x
		}
	}
}

// gammaAtLeastOne draws Gamma(shape, 1) for shape >= 1 (Marsaglia and Tsang, "A Simple Method for
// Generating Gamma Variables", ACM TOMS 26(3), 2000). The result is d*v > 0.
func (r *rng) gammaAtLeastOne(shape float64) float64 {
	d := shape - 1.0/3.0
	c := 1 / math.Sqrt(9*d)
	for {
		var x, v float64
		for {
			x = r.normal()
			v = 1 + c*x
			if v > 0 { // v <= 0 lies outside the transformation's support: redraw
				break
			}
		}
		v = v * v * v
		u := r.uniformOpen()
		x2 := x * x
		if u < 1-0.0331*x2*x2 { // the squeeze: accepts about 98% without a logarithm
			return d * v
		}
		if math.Log(u) < 0.5*x2+d*(1-v+math.Log(v)) {
			return d * v
		}
	}
}

// logGammaBelowOne returns the logarithm of a Gamma(shape, 1) draw for 0 < shape < 1, by the boost
// G(shape) = G(shape + 1) * U^(1/shape). In logarithms, because U^(1/shape) underflows to 0 for small
// shapes (shape = 0.01 and U = 0.5 give 2^-100; shape = 0.001 gives 2^-1000, below the smallest double).
func (r *rng) logGammaBelowOne(shape float64) float64 {
	return math.Log(r.gammaAtLeastOne(shape+1)) + math.Log(r.uniformOpen())/shape
}

// beta draws Beta(a, b) as X / (X + Y) with X ~ Gamma(a), Y ~ Gamma(b); a and b must be finite and > 0,
// which loadTable and the prior flags guarantee.
func (r *rng) beta(a, b float64) float64 {
	if a >= 1 && b >= 1 {
		// The common case (every click-through posterior): both draws are d*v > 0, no underflow.
		x := r.gammaAtLeastOne(a)
		return x / (x + r.gammaAtLeastOne(b))
	}
	// A shape below 1: compare in logarithms, X / (X + Y) = 1 / (1 + exp(log Y - log X)). This covers
	// both draws underflowing to 0, where the plain ratio would be 0/0; exp overflowing to +Inf gives 0.
	var la, lb float64
	if a < 1 {
		la = r.logGammaBelowOne(a)
	} else {
		la = math.Log(r.gammaAtLeastOne(a))
	}
	if b < 1 {
		lb = r.logGammaBelowOne(b)
	} else {
		lb = math.Log(r.gammaAtLeastOne(b))
	}
	return 1 / (1 + math.Exp(lb-la))
}
