{{/* Chart name, truncated to a DNS label. */}}
{{- define "rlhfless.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name; the release name alone when it already contains the chart's. */}}
{{- define "rlhfless.fullname" -}}
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

{{- define "rlhfless.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that identify the operator's pods (stable across upgrades). */}}
{{- define "rlhfless.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rlhfless.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* Labels on every object of the release. */}}
{{- define "rlhfless.labels" -}}
helm.sh/chart: {{ include "rlhfless.chart" . }}
app.kubernetes.io/name: {{ include "rlhfless.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: rlhfless
{{- end }}

{{- define "rlhfless.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "rlhfless.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag, or repository@digest when a digest is given. */}}
{{- define "rlhfless.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The CPU function and driver image: functions.images.cpu, else the operator's image. */}}
{{- define "rlhfless.cpuImage" -}}
{{- $img := .Values.functions.images.cpu }}
{{- if not (or $img.repository $img.tag $img.digest) }}
{{- include "rlhfless.image" . }}
{{- else }}
{{- $repo := default .Values.image.repository $img.repository }}
{{- if $img.digest }}
{{- printf "%s@%s" $repo $img.digest }}
{{- else }}
{{- printf "%s:%s" $repo (default (default .Chart.AppVersion .Values.image.tag) $img.tag) }}
{{- end }}
{{- end }}
{{- end }}

{{/* The GPU function image: functions.images.gpu, else the operator's repository with the
     "-gpu" variant of its tag. */}}
{{- define "rlhfless.gpuImage" -}}
{{- $img := .Values.functions.images.gpu }}
{{- $repo := default .Values.image.repository $img.repository }}
{{- if $img.digest }}
{{- printf "%s@%s" $repo $img.digest }}
{{- else }}
{{- $tag := printf "%s-gpu" (default .Chart.AppVersion .Values.image.tag) }}
{{- printf "%s:%s" $repo (default $tag $img.tag) }}
{{- end }}
{{- end }}

{{/* The operator's RBAC rules (rlhfless/operator/rbac.py OPERATOR_RULES; the chart tests
     compare the two), one per (apiGroup, resource). `clusterwide` adds kopf's CRD scan. */}}
{{- define "rlhfless.rules" -}}
# The progress ConfigMap of each job: created empty, reset before each driver run, read.
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["create", "get", "patch"]
# kopf posts events about handler progress on the jobs.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
# Never called by the operator: held only to grant it to each job's driver (metering its
# functions' pod lifetimes), since nobody may grant a right they do not hold.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
# Each job's function token: created once, never read back.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["create"]
# Each job's driver identity.
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["create"]
{{- if .clusterwide }}
# kopf notices CRDs appearing/changing (its resource observer); not in namespaced mode.
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- end }}
# Each job's driver pod: started, observed, stopped (deleted) by the operator.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["create", "delete", "get"]
# Each job's NetworkPolicy around its functions.
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["create", "get", "patch"]
# Each job's driver Role (narrowed to the job's objects) and its binding.
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["rolebindings"]
  verbs: ["create"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles"]
  verbs: ["create", "get", "patch"]
# The custom resource: kopf watches it and patches finalizers/annotations on it.
- apiGroups: ["rlhfless.io"]
  resources: ["rlhfjobs"]
  verbs: ["list", "patch", "watch"]
# blockOwnerDeletion on the children (OwnerReferencesPermissionEnforcement).
- apiGroups: ["rlhfless.io"]
  resources: ["rlhfjobs/finalizers"]
  verbs: ["update"]
# Progress (phase, step, reward, cost, conditions) goes through the status subresource.
- apiGroups: ["rlhfless.io"]
  resources: ["rlhfjobs/status"]
  verbs: ["patch"]
# One Knative Service per stage: get-or-create, patch on spec changes and to scale to zero;
# owner references delete them with the job, so no delete verb.
- apiGroups: ["serving.knative.dev"]
  resources: ["services"]
  verbs: ["create", "get", "patch"]
{{- end }}
