{{/* Names and labels shared by every component. Component helpers live next to their templates. */}}

{{- define "kubedpo.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kubedpo.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* "<fullname>-<suffix>" in at most 63 characters: the prefix is cut, never the suffix, so a
    53-character release name still gives distinct, valid names. include "kubedpo.suffixedName" (list . "metrics") */}}
{{- define "kubedpo.suffixedName" -}}
{{- $ctx := index . 0 -}}
{{- $suffix := index . 1 -}}
{{- $prefix := include "kubedpo.fullname" $ctx | trunc (int (sub 62 (len $suffix))) | trimSuffix "-" -}}
{{- printf "%s-%s" $prefix $suffix }}
{{- end }}

{{/* An image reference from {repository, tag, digest}: a digest pins it (tag ignored);
    global.imageRegistry (umbrella charts, mirrors) replaces the repository's registry host.
    include "kubedpo.imageRef" (list . .Values.image) */}}
{{- define "kubedpo.imageRef" -}}
{{- $ctx := index . 0 -}}
{{- $img := index . 1 -}}
{{- $repo := $img.repository -}}
{{- $registry := (default dict $ctx.Values.global).imageRegistry -}}
{{- if $registry -}}
{{- $parts := splitList "/" $repo -}}
{{- $host := first $parts -}}
{{- if and (gt (len $parts) 1) (or (contains "." $host) (contains ":" $host) (eq $host "localhost")) -}}
{{- $repo = join "/" (rest $parts) -}}
{{- end -}}
{{- $repo = printf "%s/%s" (trimSuffix "/" $registry) $repo -}}
{{- end -}}
{{- if $img.digest -}}
{{- printf "%s@%s" $repo $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $repo (default $ctx.Chart.AppVersion $img.tag) -}}
{{- end -}}
{{- end }}

{{- define "kubedpo.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of one component: include "kubedpo.selectorLabels" (list . "operator") */}}
{{- define "kubedpo.selectorLabels" -}}
{{- $ctx := index . 0 -}}
app.kubernetes.io/name: {{ include "kubedpo.name" $ctx }}
app.kubernetes.io/instance: {{ $ctx.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* Common labels of one component: include "kubedpo.labels" (list . "operator") */}}
{{- define "kubedpo.labels" -}}
{{- $ctx := index . 0 -}}
helm.sh/chart: {{ include "kubedpo.chart" $ctx }}
{{ include "kubedpo.selectorLabels" . }}
app.kubernetes.io/version: {{ $ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $ctx.Release.Service }}
app.kubernetes.io/part-of: kubedpo
{{- with $ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* prometheus-operator's CRDs are installed: monitors render only then (NOTES.txt says when skipped). */}}
{{- define "kubedpo.hasMonitoringAPI" -}}
{{- if .Capabilities.APIVersions.Has "monitoring.coreos.com/v1" }}true{{ end }}
{{- end }}

{{- define "kubedpo.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kubedpo.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Cluster-wide unless operator.watchNamespaces lists namespaces (then: one Role per namespace). */}}
{{- define "kubedpo.clusterwide" -}}
{{- if not .Values.operator.watchNamespaces }}true{{ end }}
{{- end }}
